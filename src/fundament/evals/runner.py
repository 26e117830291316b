"""`evaluate(EvalConfig)`: every strategy on the same splits of every task, at every training size
and seed; cached cells are read back, the rest computed with a progress display; then the
summary, results.json and the report. A cell that raises is listed with its error (and left out
of the cache, so a rerun retries it); the other cells still run. Owns the run's fundament server
(started only if a cell needs it) and stops it on the way out.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FundamentError
from .cache import ResultCache
from .config import EvalConfig
from .splits import fingerprint, held_out, train_subset
from .strategies import DESCRIPTIONS, expand, make, sizes_for
from .summary import cell_metrics, curves, majority_baseline, summarize, verdict
from .taskfile import resolve_task

if TYPE_CHECKING:
    from .server import Fundament


@dataclass
class Context:
    """What a strategy's run may use besides its examples."""

    config: EvalConfig
    fundament: Fundament
    features: object  # probes.FeatureCache
    artifacts: Path
    progress: object = None  # progress(done, total, phase="") for the current cell

    def artifact(self, task, strategy: str, size: int, seed: int, suffix: str) -> Path:
        return self.artifacts / task.name / f"{strategy}-n{size}-s{seed}{suffix}"


def plan(cfg: EvalConfig, tasks: list) -> tuple[list, list[tuple], dict]:
    """(strategies, cells as (task, strategy, size, seed), sizes each strategy cannot run at).
    A strategy whose 0-example point is another's (few-shot, LoRA: zero-shot) brings that
    strategy's cell along when the sizes hold 0."""
    names = expand(cfg.strategies)
    for name in list(names):
        anchor = make(name).at_zero
        if anchor and 0 in cfg.sizes and anchor not in names:
            names.insert(0, anchor)
    strategies = [make(n) for n in names]
    cells: list[tuple] = []
    skipped: dict[str, dict[str, list[int]]] = {}
    for task in tasks:
        for s in strategies:
            run, skip = sizes_for(s, cfg.sizes, len(task.train))
            if skip:
                skipped.setdefault(task.name, {})[s.name] = skip
            for n in run:
                for seed in [0] if n == 0 else cfg.seeds:  # no examples: nothing random, one cell whatever the seeds
                    cells.append((task, s, n, seed))
    return strategies, cells, skipped


def _run_cell(ctx: Context, cache: ResultCache, task, strategy, size: int, seed: int, test) -> dict:
    cfg = ctx.config
    train = train_subset(task, size, seed)
    # The input prefix enters the key only of strategies whose prompt shows it, so adding it left
    # the other strategies' cached cells valid.
    prefix = [task.input_prefix] if getattr(strategy, "uses_input_prefix", False) and task.input_prefix else []
    key = fingerprint(
        task.name,
        task.classes,
        task.instruction,
        task.answer_prefix,
        task.descriptions,
        train,
        test,
        strategy.name,
        strategy.settings(cfg),
        cfg.latency_sample,
        *prefix,
        *(["vllm"] if ctx.fundament.backend(cfg.model) == "vllm" else []),  # not fundament's engine's cells
    )
    cell = (task.name, strategy.name, size, seed, key)
    record = cache.get(*cell)
    if record is not None:
        return {**record, "cached": True}
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    outcome = strategy.run(ctx, task, train, test, seed)
    record = {
        "task": task.name,
        "strategy": strategy.name,
        "size": size,
        "seed": seed,
        "key": key,
        "settings": strategy.settings(cfg),
        "wall_s": time.perf_counter() - t0,
        "load_average": (load0 + os.getloadavg()[0]) / 2,  # how busy the machine was: timings depend on it
        "gold": [e.label for e in test],
        "outcome": outcome.to_dict(),
    }
    cache.put(record, *cell)
    return record


def describe(e: Exception) -> str:
    """A failed cell's error in one line: what failed and why."""
    import openai

    if isinstance(e, FundamentError):
        return e.message
    if isinstance(e, openai.APIConnectionError):  # its message is only "Connection error.": name the URL and the cause
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        return f"cannot reach {e.request.url}: {e.message}{cause}"
    if isinstance(e, openai.APIStatusError):
        return f"{e.request.url} answered {e.status_code}: {e.message}"
    return f"{type(e).__name__}: {e}"


def _machine(records: list[dict]) -> dict:
    loads = [r["load_average"] for r in records if r.get("load_average") is not None]
    return {"cpus": os.cpu_count(), "load_average": sum(loads) / len(loads) if loads else None}


def evaluate(cfg: EvalConfig, console=None) -> dict:
    """Run (or read back) every cell, write the report under cfg.out, and return the results."""
    import openai
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .probes import FeatureCache
    from .report import write_report
    from .server import Fundament

    console = console or Console(stderr=True)
    tasks = [resolve_task(t, cfg.data_dir) for t in cfg.tasks]
    strategies, cells, skipped = plan(cfg, tasks)
    root = cfg.cache_root
    cache = ResultCache(root)
    fundament = Fundament(cfg.base_url, cfg.api_key, root / "server.log", ["--vllm"] if cfg.vllm else [])
    ctx = Context(cfg, fundament, FeatureCache(root / "features.sqlite"), root / "artifacts")
    tests = {t.name: held_out(t, cfg.limit) for t in tasks}
    records, errors = [], []
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            overall = bar.add_task("[bold]cells", total=len(cells))
            current = bar.add_task("", total=None)
            for task, s, n, seed in cells:
                what = f"{task.name} {s.name} n={n} seed={seed}"
                ctx.progress = lambda done, total, phase="", what=what: bar.update(
                    current, completed=done, total=total, description=f"  {what} {phase}"
                )
                bar.update(current, completed=0, total=None, description=f"  {what}")
                try:
                    rec = _run_cell(ctx, cache, task, s, n, seed, tests[task.name])
                    rec["metrics"] = cell_metrics(rec, task.classes)
                except (
                    Exception
                ) as e:  # recorded, not cached; the rest of the run goes on and the command fails at the end
                    message = describe(e)
                    errors.append(
                        {
                            "task": task.name,
                            "strategy": s.name,
                            "size": n,
                            "seed": seed,
                            "error": message,
                            "type": type(e).__name__,
                        }
                    )
                    if not isinstance(
                        e, (FundamentError, openai.APIError)
                    ):  # not an expected failure: a bug, shown where it is
                        bar.console.print_exception()
                    bar.console.print(f"{what}: failed: {message}", style="red", highlight=False, markup=False)
                else:
                    records.append(rec)
                    m = rec["metrics"]  # one line per cell: the record of a long run, in a log file too
                    took = "cached" if rec.get("cached") else f"{rec['wall_s']:.0f} s"
                    bar.console.print(
                        f"{what}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} ({took})", highlight=False
                    )
                bar.advance(overall)
    finally:
        fundament.close()
    results = {
        "config": cfg.to_dict(),
        "wall_s": time.perf_counter() - started,
        "cells_wall_s": sum(r["wall_s"] for r in records),  # what computing every cell took, cached or not
        "cells": len(records),
        "cells_computed": sum(not r.get("cached") for r in records),
        "cells_failed": len(errors),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(records),
        "strategies": {s.name: DESCRIPTIONS[s.name] for s in strategies},
        "tasks": {},
        "errors": errors,
    }
    for task in tasks:
        mine = [r for r in records if r["task"] == task.name]
        rows = summarize(mine, task.classes)
        test = tests[task.name]
        results["tasks"][task.name] = {
            "classes": task.classes,
            "train_size": len(task.train),
            "test_split": task.test_split,
            "test_size": len(task.test),
            "n_test": len(test),
            "limit": cfg.limit,
            "majority": majority_baseline([e.label for e in test], [e.label for e in task.train], task.classes),
            "skipped": skipped.get(task.name, {}),
            "rows": rows,
            "curves": curves(rows, strategies),
            "verdict": verdict(rows),
            "cells": [
                {k: r[k] for k in ("strategy", "size", "seed", "key", "wall_s", "metrics")}
                | {"info": r["outcome"]["info"]}
                for r in mine
            ],
        }
    write_report(results, cfg.out)
    return results
