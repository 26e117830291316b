#!/usr/bin/env bash
# Builds the peer the engine benchmark measures against: llama.cpp's llama-server and the
# llama_cpp Python bindings, from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp).
# AMX is kept off: llama.cpp's AMX kernels crash on this CPU once a prompt has more than one token.
# The bindings load the libllama.so built here (LLAMA_CPP_LIB_PATH), so llama.cpp compiles once.
set -euo pipefail
PEER=${1:-/work/peer}
VERSION=0.3.36
mkdir -p "$PEER" && cd "$PEER"
python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz"
cmake -S "llama_cpp_python-$VERSION/vendor/llama.cpp" -B build-server -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
cmake --build build-server --target llama-server -j"$(nproc)"
mkdir -p py && cp -r "llama_cpp_python-$VERSION/llama_cpp" py/
python3 -m pip install --quiet --target py diskcache
echo "llama-server: $PEER/build-server/bin/llama-server; bindings: --llama-py $PEER/py --llama-lib $PEER/build-server/bin"
