"""Distributed fine-tuning on one machine: 1 process x N threads against N processes x 1 thread
(torchrun, DDP or FSDP over gloo), the same job: SmolLM2-135M, SST-2 chat examples, one epoch,
the same global batch, seed and learning rate. Prints tokens/s (steady state: step 1, which warms
the allocator and oneDNN, left out; all ranks' tokens together) and the loss per step of each run
against the 1-process one. A third run, 1 process with rows of `--control-row-tokens`, packs the
same batches into more rows: how far a run drifts from itself when only its summation order
changes, the yardstick for the DDP/FSDP loss differences. No target: the cores bound them all.

    .venv/bin/python benchmarks/bench_distributed.py --examples 96 --batch-size 8 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_tune import base_dir, records  # noqa: E402


class Steps:
    """TuneHooks that keep each step's metrics."""

    def __init__(self):
        from fundament.adapt.tune import TuneHooks

        class H(TuneHooks):
            def __init__(s):
                s.steps = []

            def on_step(s, step, total, metrics):
                s.steps.append(metrics)

        self.hooks = H()


def run(mode: str, exs, cfg_args: dict, threads: int, procs: int, control_rows: int) -> dict:
    import torch

    from fundament.adapt.hyperparameters import resolve_hyperparameters
    from fundament.adapt.tune import fine_tune
    from fundament.config import FineTuningConfig
    from fundament.jobs.launch import TorchrunJob

    ext = {"compile": False}
    if mode in ("ddp", "fsdp"):
        ext.update(nproc_per_node=procs, distributed=mode)
    if mode == "control":
        ext["row_tokens"] = control_rows
    cfg = resolve_hyperparameters(cfg_args, len(exs), ext, seed=3)
    rec = Steps().hooks
    out = Path(tempfile.mkdtemp(prefix=f"bench-dist-{mode}-"))
    t = time.perf_counter()
    if mode in ("ddp", "fsdp"):
        TorchrunJob(f"bench-{mode}", out, cfg, FineTuningConfig(threads_per_process=1)).run(base_dir(), exs, None, rec)
    else:
        torch.set_num_threads(threads)
        fine_tune(base_dir(), exs, None, cfg, out, rec)
    wall = time.perf_counter() - t
    steady = rec.steps[1:]
    tokens = sum(m["tokens"] for m in steady[-1:]) - rec.steps[0]["tokens"]
    seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_second"] for a, b in zip(rec.steps, steady))
    return {
        "mode": mode,
        "processes": procs if mode in ("ddp", "fsdp") else 1,
        "threads_per_process": 1 if mode in ("ddp", "fsdp") else threads,
        "tokens_per_second": tokens / seconds,
        "median_step_tokens_per_second": statistics.median(m["tokens_per_second"] for m in steady),
        "wall_s": wall,
        "losses": [m["train_loss"] for m in rec.steps],
    }


def compare(results: dict) -> None:
    """Each run's speed and loss per step against the 1-process run's, added to its entry and printed."""
    one = results.get("one")
    if not one:
        return
    for mode, r in results.items():
        diffs = [abs(b - a) for a, b in zip(one["losses"], r["losses"])]
        r["ratio_to_one_process"] = r["tokens_per_second"] / one["tokens_per_second"]
        r["step1_rel_loss_diff"] = diffs[0] / one["losses"][0]
        r["mean_abs_loss_diff"] = sum(diffs) / len(diffs)
        r["max_abs_loss_diff"] = max(diffs)
        r["max_rel_loss_diff"] = max(d / a for d, a in zip(diffs, one["losses"]))
        r["mean_loss"] = sum(r["losses"]) / len(r["losses"])
        print(
            f"{mode:8} speed {r['ratio_to_one_process']:.2f}x of 1 process; loss vs 1 process over "
            f"{len(diffs)} steps: step 1 {r['step1_rel_loss_diff']:.1e} (relative), mean |diff| "
            f"{r['mean_abs_loss_diff']:.4f}, max |diff| {r['max_abs_loss_diff']:.4f}; mean loss {r['mean_loss']:.4f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the 1-process run")
    p.add_argument("--modes", default="one,ddp,fsdp,control")
    p.add_argument("--control-row-tokens", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distributed.json"))
    args = p.parse_args()

    from fundament.adapt.examples import encode_example
    from fundament.models.tokenizer import ChatTokenizer

    tok = ChatTokenizer(base_dir())
    exs = [encode_example(tok, r, 2048) for r in records(args.examples)]
    cfg_args = {"n_epochs": 1, "batch_size": args.batch_size, "learning_rate_multiplier": 1.0}
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run(mode, exs, cfg_args, args.threads, args.procs, args.control_row_tokens)
        r = results[mode]
        print(
            f"{mode:8} {r['processes']} proc x {r['threads_per_process']} threads: "
            f"{r['tokens_per_second']:8.0f} tokens/s (wall {r['wall_s']:.1f} s)",
            flush=True,
        )
    compare(results)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "examples": args.examples,
        "batch_size": args.batch_size,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
