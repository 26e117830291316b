"""The prompting report: every task's test split classified by the default generation model with
zero-shot, k random, k nearest (listed, and as chat turns) and the nearest + zero-shot ensemble
prompts, each without and with calibration (content-free and batch: both from the same pass over
the inputs), written as markdown with accuracy, macro-F1, expected calibration error and inputs/s
per cell.

    python -m fundament.evals.prompting_report [--tasks sst2,trec,sms_spam] [--limit N] [--out docs/reports/prompting.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from functools import partial

from .metrics import accuracy, expected_calibration_error, macro_f1
from .tasks import TASKS, Task, load_task

CALIBRATION_COLUMNS = ("none", "content_free", "batch")


@dataclass
class Strategy:
    key: str  # as --strategies names it
    name: str
    k: int | list[int]
    selection: str = "nearest"
    example_format: str | None = None  # None: the run's --example-format


def strategies(k: int) -> list[Strategy]:
    return [
        Strategy("zero", "zero-shot", 0),
        Strategy("random", f"k={k} random", k, "random"),
        Strategy("nearest", f"k={k} nearest", k, "nearest"),
        Strategy("nearest-turns", f"k={k} nearest, as chat turns", k, "nearest", "turns"),
        Strategy("ensemble", f"k={k} nearest + zero-shot ensemble", [0, k], "nearest"),
    ]


@dataclass
class Cell:
    task: str
    strategy: str
    calibration: str
    accuracy: float
    macro_f1: float
    ece: float
    inputs_per_s: float


def cells_for(task: Task, strategy: Strategy, scores, seconds: float) -> list[Cell]:
    """One cell per calibration, all from the same LabelScores."""
    gold = [e.label for e in task.test[: len(scores.examples)]]
    out = []
    for mode in CALIBRATION_COLUMNS:
        p = scores.probabilities(mode)  # (inputs, labels)
        pred = [scores.names[i] for i in p.argmax(axis=1)]
        conf = p.max(axis=1).tolist()
        out.append(
            Cell(
                task.name,
                strategy.name,
                mode,
                accuracy(gold, pred),
                macro_f1(gold, pred, task.classes),
                expected_calibration_error(conf, [g == q for g, q in zip(gold, pred)]),
                len(gold) / seconds,
            )
        )
    return out


def run(
    task_names: list[str],
    limit: int | None,
    k: int,
    seed: int,
    threads: int | None,
    example_format: str,
    which: list[str],
):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..adapt import Classifier, PromptOptions
    from ..config import ServeConfig
    from ..engine.engine import reserve_cpu_for_engines
    from ..registry import ModelRegistry

    reserve_cpu_for_engines()
    cfg = ServeConfig()
    cfg.engine.threads = threads
    registry = ModelRegistry(cfg)
    registry.load_all()
    registry.start()
    lm = next(iter(registry.generators.values()))
    clf = Classifier(lm, next(iter(registry.embedders.values())).embedder)
    cells: list[Cell] = []
    index_seconds: dict[str, float] = {}
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    try:
        with Progress(*columns) as bar:
            for name in task_names:
                task = load_task(name)
                test = task.test[:limit] if limit else task.test
                pool = [{"input": e.text, "label": e.label} for e in task.train]
                t = time.perf_counter()
                if any(s.selection == "nearest" and s.key in which for s in strategies(k)):
                    bar.console.print(f"{name}: embedding the {len(pool):,}-example pool for nearest selection")
                    clf.pool_vectors([e["input"] for e in pool])
                    index_seconds[name] = time.perf_counter() - t
                labels = [{"name": c, "description": (task.descriptions or {}).get(c, "")} for c in task.classes]
                for strategy in [s for s in strategies(k) if s.key in which]:
                    job = bar.add_task(f"{name} {strategy.name}", total=len(test))
                    t = time.perf_counter()
                    options = PromptOptions(
                        task.instruction,
                        pool,
                        strategy.k,
                        strategy.selection,
                        seed,
                        task.answer_prefix,
                        strategy.example_format or example_format,
                        task.input_prefix,
                    )
                    scores = asyncio.run(
                        clf.score(
                            [e.text for e in test],
                            labels,
                            options,
                            content_free=True,
                            progress=partial(bar.advance, job),
                        )
                    )
                    seconds = time.perf_counter() - t
                    new = cells_for(replace(task, test=test), strategy, scores, seconds)
                    cells += new
                    best = max(new, key=lambda c: c.accuracy)
                    bar.console.print(
                        f"{name} {strategy.name}: accuracy {', '.join(f'{c.calibration} {c.accuracy:.3f}' for c in new)} ({new[0].inputs_per_s:.1f} inputs/s; best {best.calibration})"
                    )
    finally:
        registry.stop()
    return cells, index_seconds


def machine() -> str:
    import torch

    from ..models.device import cpu_name

    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores available, torch {torch.__version__}, Python {platform.python_version()}"


def markdown(
    cells: list[Cell],
    index_seconds: dict[str, float],
    command: str,
    tasks: list[str],
    limit: int | None,
    threads: int | None,
    example_format: str,
    notes: str,
) -> str:
    lines = [
        "# Prompting report: SmolLM2-135M-Instruct",
        "",
        f"Made by `{command}` on {datetime.date.today().isoformat()}, on {machine()}; engine threads: {threads or 'all cores'}; "
        f"examples in the `{example_format}` format; bfloat16 weights with int4/int8 decode copies where the CPU runs bfloat16.",
        "Inputs/s is one pass per strategy (every label, and the content-free input, scored in one engine",
        "request per input); the three calibration columns come from that same pass.",
        "",
    ]
    for name in tasks:
        task = load_task(name)
        n = min(limit, len(task.test)) if limit else len(task.test)
        lines += [
            f"## {name}: {task.test_split}, {n} inputs; pool: train, {len(task.train):,} examples",
            "",
            f'Instruction: "{task.instruction}"; answer prefix: "{task.answer_prefix}"; input prefix: "{task.input_prefix}"; '
            f"labels: {', '.join(task.classes)}."
            + (
                f" Embedding the pool for nearest selection took {index_seconds[name]:.0f} s (once)."
                if name in index_seconds
                else ""
            ),
            "",
            "| strategy | calibration | accuracy | macro-F1 | ECE | inputs/s |",
            "|---|---|---|---|---|---|",
        ]
        mine = [c for c in cells if c.task == name]
        best = max(mine, key=lambda c: c.accuracy) if mine else None
        for c in mine:
            b = "**" if c is best else ""
            lines.append(
                f"| {c.strategy} | {c.calibration} | {b}{c.accuracy:.1%}{b} | {c.macro_f1:.3f} | {c.ece:.3f} | {c.inputs_per_s:.1f} |"
            )
        lines.append("")
    return "\n".join(lines) + ("\n" + notes.strip() + "\n" if notes else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fundament.evals.prompting_report", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--limit", type=int, help="only the first N test inputs of each task (for development)")
    ap.add_argument("--k", type=int, default=8, help="examples per prompt")
    ap.add_argument("--seed", type=int, default=0, help="for random selection")
    ap.add_argument("--threads", type=int, help="engine threads (default: all cores)")
    ap.add_argument(
        "--example-format", choices=["list", "turns"], default="list", help="how few-shot examples are shown"
    )
    ap.add_argument(
        "--strategies",
        default="zero,random,nearest,nearest-turns,ensemble",
        help="comma-separated, from zero, random, nearest, nearest-turns, ensemble",
    )
    ap.add_argument("--notes", help="a markdown file appended to the report (what was tried)")
    ap.add_argument("--out", default="docs/reports/prompting.md")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    which = args.strategies.split(",")
    cells, index_seconds = run(tasks, args.limit, args.k, args.seed, args.threads, args.example_format, which)
    command = "python -m fundament.evals.prompting_report " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = open(args.notes).read() if args.notes else ""
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(
            markdown(cells, index_seconds, command.strip(), tasks, args.limit, args.threads, args.example_format, notes)
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
