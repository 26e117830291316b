"""The engine's paths side by side on one model family, in process: the native kernel, the native
engine's PyTorch path (what Gemma took before it was in the kernel) and the transformers fallback.
A random model of the family at SmolLM2-135M's shape (the speed depends on shapes, not values),
bf16, 64 tokens a request, 1 and 16 streams, the paths interleaved `--reps` times; prints tok/s
and each path's ratio to the kernel's.

    .venv/bin/python benchmarks/bench_paths.py --family gemma2 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from fundament.config import EngineConfig
from fundament.engine import Engine
from fundament.engine.request import EngineRequest, SamplingParams
from fundament.models.llama import LlamaModel
from fundament.models.transformers_model import TransformersModel

SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=2048,
    pad_token_id=0,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi4-mini": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.75}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 512}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 512}),
}
PATHS = ("kernel", "pytorch", "transformers")


def make_model(family: str, path: Path) -> None:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SHAPE, **extra)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    model.save_pretrained(path)


def load(path: Path, kind: str):
    if kind == "transformers":
        return TransformersModel.from_dir(path, dtype=torch.bfloat16)
    return LlamaModel.from_dir(path, dtype=torch.bfloat16, native_decode=kind == "kernel")


def tokens_per_second(model, streams: int, new_tokens: int) -> float:
    outs: list = []
    reqs = [
        EngineRequest(
            [5 + i, 17, 99, 3, 250, 41, 7, 64, 12] * 4,
            SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True),
            outs.append,
        )
        for i in range(streams)
    ]
    engine = Engine(model, EngineConfig(), [2])
    start = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    while not all(r.finished for r in reqs):
        engine.step()
    return streams * new_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=list(FAMILIES), default="gemma2")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of: " + ", ".join(PATHS))
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    print(
        "CPU flags: "
        + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "avx512_vnni", "amx_tile"))
    )
    paths, levels = args.paths.split(","), [int(s) for s in args.streams.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_model(args.family, Path(tmp))
        for rep in range(args.reps):
            for kind in paths:
                model = load(Path(tmp), kind)
                for n in levels:
                    rate = tokens_per_second(model, n, args.new_tokens)
                    results.setdefault((kind, n), []).append(rate)
                    print(f"run {rep + 1}: {args.family} {kind:>12} {n:>3} streams {rate:7.1f} tok/s", flush=True)
    print(f"\n{args.family}, median tok/s (ratio to the kernel's):")
    for n in levels:
        base = statistics.median(results[("kernel", n)]) if ("kernel", n) in results else None
        cells = []
        for kind in paths:
            m = statistics.median(results[(kind, n)])
            cells.append(f"{kind} {m:.1f}" + (f" ({m / base:.2f}x)" if base else ""))
        print(f"  {n:>3} streams: " + ", ".join(cells))


if __name__ == "__main__":
    main()
