"""Server start time (first start dequantizes the GGUF, second reads the cache) and single-stream
decode tokens/s of fundament's engine beside HF transformers' `generate`, on the same weights, in
the same run, interleaved. Prints ratios. Not a test: run it by hand.

    .venv/bin/python benchmarks/bench_startup_decode.py [--tokens 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def start_time(home: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a cache of its own in the scratch home: the first start dequantizes, as a new user's does
    env = dict(os.environ, FUNDAMENT_HOME=str(home), FUNDAMENT_CACHE=str(home / "cache"), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fundament.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - t
            except httpx.HTTPError:
                time.sleep(0.1)
            if proc.poll() is not None:
                raise RuntimeError("server exited")
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch

    home = Path(tempfile.mkdtemp(prefix="fundament-bench-"))
    first, second = start_time(home), start_time(home)
    print(f"server start: first {first:.1f}s (dequantizes the GGUF), second {second:.1f}s (cache)")

    os.environ.update(FUNDAMENT_HOME=str(home), FUNDAMENT_CACHE=str(home / "cache"))
    from transformers import AutoModelForCausalLM

    from fundament.config import DEFAULT_MODELS, EngineConfig
    from fundament.engine import Engine, EngineRequest, SamplingParams
    from fundament.models.device import resolve_dtype
    from fundament.models.llama import LlamaModel
    from fundament.models.loading import hf_dir_for
    from fundament.models.tokenizer import ChatTokenizer

    d = hf_dir_for(DEFAULT_MODELS[0])
    tok = ChatTokenizer(d)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}])
    cfg = EngineConfig()  # the server's defaults (dtype auto: bfloat16 + int8 decode weights here)
    ours = Engine(
        LlamaModel.from_dir(d, dtype=resolve_dtype(cfg.dtype), int8_decode=cfg.int8_decode), cfg, tok.eos_token_ids
    )
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    n = args.tokens
    print(
        f"fundament dtype {ours.model.dtype}, threads: {torch.get_num_threads()}, prompt {len(prompt)} tokens, {n} new tokens, greedy"
    )

    def run_ours():
        outs = []
        req = EngineRequest(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), outs.append)
        ours.submit(req)
        ours.step()  # prefill + first token
        t = time.perf_counter()
        while not req.finished:
            ours.step()
        return (len(outs) - 1) / (time.perf_counter() - t)

    def run_hf():
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            total = time.perf_counter() - t
        return (n - 1) / (total - t1)

    run_ours(), run_hf()  # warm-up
    a, b = [], []
    for _ in range(args.reps):
        a.append(run_ours())
        b.append(run_hf())
    fa, fb = statistics.median(a), statistics.median(b)
    print(f"decode tokens/s: fundament {fa:.1f}, transformers generate {fb:.1f}, ratio {fa / fb:.2f}x")
    shutil.rmtree(home, ignore_errors=True)  # its 0.5 GB dequantized copy


if __name__ == "__main__":
    main()
