#!/usr/bin/env bash
# llama.cpp's llama-server, built from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp):
# the loader the GGUF export is checked with (tests/test_export.py) and the engine benchmark's peer;
# and llama.cpp's own converter and quantizer (convert_hf_to_gguf.py with its gguf-py, llama-quantize),
# which make the GGUF files of each model family, K-quants included, that tests/test_gguf_families.py loads.
# AMX kernels off: they crash on this project's CPUs once a prompt has more than one token. The
# instruction sets are named, not -march=native (which would turn AMX on): AVX512 with VNNI and BF16
# where the CPU has them, else AVX2 with FMA and F16C (a build for a newer CPU dies of SIGILL).
# A finished build is kept in ~/.cache/fundament/llama.cpp/<key> (this script, the instruction
# sets) and copied from there by the next checkout on the same machine, as pip keeps its wheels:
# 4-10 minutes of every clean clone's `make test`.
# Usage: scripts/llama_cpp.sh DIR  (about 4 minutes on 2 cores; DIR/bin/llama-server when done)
set -euo pipefail
OUT=$(realpath -m "${1:-.llama.cpp}")
VERSION=0.3.36
PYTHON=${PYTHON:-python3}
if grep -qw avx512_bf16 /proc/cpuinfo; then
  ISA="-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
else
  ISA="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
fi
KEY=$( (cat "$0"; echo "$ISA") | sha256sum | cut -c1-16)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/fundament/llama.cpp/$KEY"
if [ -x "$CACHE/bin/llama-server" ] && [ -x "$CACHE/bin/llama-quantize" ] && [ -f "$CACHE/convert/convert_hf_to_gguf.py" ]; then
  mkdir -p "$OUT"
  rm -rf "$OUT/convert"
  cp -r "$CACHE/convert" "$OUT/convert"
  mkdir -p "$OUT/bin"
  cp "$CACHE/bin/llama-quantize" "$OUT/bin/llama-quantize"
  cp "$CACHE/bin/llama-server" "$OUT/bin/llama-server.tmp"
  mv "$OUT/bin/llama-server.tmp" "$OUT/bin/llama-server"
  echo "$OUT/bin/llama-server (built before: $CACHE)"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz"
cmake -S "llama_cpp_python-$VERSION/vendor/llama.cpp" -B build -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF $ISA \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF > cmake.log
cmake --build build --target llama-server llama-quantize -j"$(nproc)" > build.log
mkdir -p "$OUT/bin"
cp build/bin/llama-quantize "$OUT/bin/llama-quantize"
rm -rf "$OUT/convert"
mkdir -p "$OUT/convert"
cp "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" "$OUT/convert/"
cp -r "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" "$OUT/convert/conversion"
cp -r "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py" "$OUT/convert/gguf-py"
cp build/bin/llama-server "$OUT/bin/llama-server.tmp"
mv "$OUT/bin/llama-server.tmp" "$OUT/bin/llama-server"
# into the cache whole or not at all
rm -rf "$CACHE.tmp"
mkdir -p "$CACHE.tmp"
cp -r "$OUT/bin" "$OUT/convert" "$CACHE.tmp/"
rm -rf "$CACHE"
mv "$CACHE.tmp" "$CACHE"
echo "$OUT/bin/llama-server"
