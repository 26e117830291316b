"""Training speed: fundament's LoRA trainer beside Hugging Face's Trainer with PEFT, same run.

Same data (SST-2 training sentences as chat examples, tokenized once by the same code), same LoRA
(r=16, alpha=32, all linear layers), same batch size, learning rate, schedule, seed and thread
count. Each trainer runs in its own subprocess (so its peak RSS is its own), alternating, and the
script prints tokens/s, the ratio and peak memory. HF's Trainer runs in float32 (its CPU default)
and with bf16=True (its fastest CPU setting); the ratio is taken against the faster of the two.
fundament compiles its decoder layers when a run trains 50k tokens or more (`compile: auto`, the
default: about 1,100 examples here); `--trainers fundament-eager,...` adds a run with compiling off.
Wall time, and so tokens/s, includes loading the model and compiling.

    .venv/bin/python benchmarks/bench_tune.py --examples 512 --batch-size 8 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
PROMPT = "Determine the sentiment of this review: '{}'"


def records(n: int) -> list[dict]:
    with open(DATA) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:n]
    return [
        {
            "messages": [
                {"role": "user", "content": PROMPT.format(r["sentence"].strip())},
                {"role": "assistant", "content": "positive" if r["label"] == "1" else "negative"},
            ]
        }
        for r in rows
    ]


def base_dir() -> Path:
    from fundament.config import DEFAULT_MODELS
    from fundament.models.loading import hf_dir_for

    return hf_dir_for(next(m for m in DEFAULT_MODELS if m.task == "generate"))


def run_one(which: str, n: int, batch: int, threads: int, seed: int) -> dict:
    import torch

    from fundament.adapt.examples import IGNORE, encode_example
    from fundament.adapt.hyperparameters import resolve_hyperparameters
    from fundament.adapt.tune import fine_tune
    from fundament.models.tokenizer import ChatTokenizer

    torch.set_num_threads(threads)
    d = base_dir()
    tok = ChatTokenizer(d)
    exs = [encode_example(tok, r, 2048) for r in records(n)]
    ext = {"compile": False} if which == "fundament-eager" else {}
    cfg = resolve_hyperparameters(
        {"n_epochs": 1, "batch_size": batch, "learning_rate_multiplier": 1.0}, n, ext, seed=seed
    )
    tokens = sum(e.n_tokens for e in exs)
    compiled = None
    if which.startswith("fundament"):
        t = time.perf_counter()
        out_dir = Path(tempfile.mkdtemp())
        fine_tune(d, exs, None, cfg, out_dir)
        wall = time.perf_counter() - t
        history = json.loads((out_dir / "metrics.json").read_text())
        compiled = json.loads((out_dir / "adapter" / "fundament_tune.json").read_text())["compiled"]
        loss = sum(m["train_loss"] for m in history) / len(history)  # the mean over steps, as HF reports it
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

        # HF labels are aligned with input_ids (the model shifts them); ours are next-token labels
        rows = [{"input_ids": e.input_ids, "labels": [IGNORE] + e.labels[:-1]} for e in exs]
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules=cfg.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=batch,
            num_train_epochs=1,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=max(1, int(-(-n // batch) * cfg.warmup_ratio)),
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=seed,
            use_cpu=True,
            bf16=which == "hf-bf16",
            save_strategy="no",
            report_to=[],
            logging_steps=10**9,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok.hf, padding=True)
        )
        out = trainer.train()
        wall = time.perf_counter() - t
        loss = out.training_loss
    return {
        "trainer": which,
        "compiled": compiled,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "train_loss": loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--trainers",
        default="fundament,hf-bf16,hf-fp32",
        help="comma-separated, in the order run: fundament (compile auto), fundament-eager (compile off), hf-bf16, hf-fp32",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.examples, a.batch_size, a.threads, a.seed)))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(a.repeats):
        for which in a.trainers.split(","):  # every trainer as many times: best of N against best of N
            cmd = [
                sys.executable,
                __file__,
                "--child",
                which,
                "--examples",
                str(a.examples),
                "--batch-size",
                str(a.batch_size),
                "--threads",
                str(a.threads),
                "--seed",
                str(a.seed),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(which, []).append(r)
            how = " (compiled)" if r["compiled"] else ""
            print(
                f"{which + how:26s} {r['tokens_per_s']:8.1f} tok/s  wall {r['wall_s']:6.1f} s  loss {r['train_loss']:.4f}  peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
    peers = {k: v["tokens_per_s"] for k, v in best.items() if k.startswith("hf-")}
    print(f"\n{a.examples} SST-2 examples, batch {a.batch_size}, {a.threads} threads, LoRA r=16 on all linear layers")
    for k, v in best.items():
        if k.startswith("fundament") and peers:
            print(
                f"{k} {v['tokens_per_s']:.1f} tok/s vs HF Trainer+PEFT "
                + " / ".join(f"{p} {t:.1f}" for p, t in peers.items())
                + f": {v['tokens_per_s'] / max(peers.values()):.2f}x the faster"
            )
    print("peak RSS MB: " + ", ".join(f"{k} {v['peak_rss_mb']:.0f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
