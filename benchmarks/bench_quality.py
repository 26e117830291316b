"""Does the fast path keep the model's quality? Perplexity of SmolLM2 on SST-2 dev sentences
with the engine's float32 weights (exactly transformers' model) and with its default fast paths
(AVX512-BF16: bfloat16, int4/int8 decode copies; AVX2: float32 with int8 rows for generated tokens
and a bfloat16 KV cache, and without int8 rows), teacher-forced token by token through the decode path, and
llama.cpp's perplexity on the same tokens when its Python bindings are given. Not a test.

    .venv/bin/python benchmarks/bench_quality.py [--sentences 200] [--llama-py DIR --llama-lib DIR]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def sentences(n: int) -> list[str]:
    path = next(p for p in sorted(DATA.iterdir()) if "dev" in p.name or "validation" in p.name)
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t" if path.suffix in (".tsv", ".txt") else ","))
    header = [h.lower() for h in rows[0]]
    col = header.index("sentence") if "sentence" in header else 0
    return [r[col] for r in rows[1 : n + 1]]


def perplexity(model, seqs: list[list[int]]) -> float:
    """Feed each sequence one token at a time (the decode path, each token as a generated one, so
    int8 rows where the model takes them) and score the next token."""
    from fundament.models.llama import Segment

    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in seqs:
            cache = model.new_cache(len(ids))
            for pos in range(len(ids) - 1):
                logits = model.forward(
                    torch.tensor([ids[pos]]), [Segment(cache, pos, 1, generated=True)], torch.tensor([0])
                )[0]
                nll -= float(torch.log_softmax(logits, -1)[ids[pos + 1]])
                count += 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--llama-py")
    ap.add_argument("--llama-lib")
    args = ap.parse_args()
    from fundament.config import DEFAULT_MODELS
    from fundament.models.llama import LlamaModel
    from fundament.models.loading import hf_dir_for, resolve_path
    from fundament.models.tokenizer import ChatTokenizer

    torch.set_num_threads(2)
    d = hf_dir_for(DEFAULT_MODELS[0])
    tok = ChatTokenizer(d)
    seqs = [[1] + tok.encode(s) for s in sentences(args.sentences)]  # <|im_start|>-style BOS id 1
    n_tokens = sum(len(s) - 1 for s in seqs)
    print(f"SST-2 dev, first {len(seqs)} sentences, {n_tokens} predicted tokens")
    for name, kw in (
        ("float32 (= transformers)", dict(dtype=torch.float32)),
        ("bfloat16 + int4/int8 decode (AVX512-BF16 default)", dict(dtype=torch.bfloat16, int8_decode=True)),
        ("float32 rows, bf16 KV (int8_activations false)", dict(dtype=torch.float32, kv_dtype=torch.bfloat16)),
        (
            "float32, int8 rows, bf16 KV (AVX2 default)",
            dict(dtype=torch.float32, kv_dtype=torch.bfloat16, int8_activations=True),
        ),
    ):
        t = time.perf_counter()
        print(
            f"  {name:40s} perplexity {perplexity(LlamaModel.from_dir(d, **kw), seqs):.3f}  ({time.perf_counter() - t:.0f}s)"
        )
    if args.llama_py:
        os.environ["LLAMA_CPP_LIB_PATH"] = args.llama_lib or ""
        sys.path.insert(0, args.llama_py)
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(resolve_path(DEFAULT_MODELS[0])), n_threads=2, n_ctx=512, logits_all=True, verbose=False
        )
        nll, count = 0.0, 0
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            lp = torch.log_softmax(torch.tensor(llm.scores[: len(ids)]), -1)
            for pos in range(len(ids) - 1):
                nll -= float(lp[pos, ids[pos + 1]])
                count += 1
        print(f"  {'llama.cpp (Q4_1 GGUF)':40s} perplexity {math.exp(nll / count):.3f}")


if __name__ == "__main__":
    main()
