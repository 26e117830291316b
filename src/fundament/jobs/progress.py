"""Following a fine-tuning job from the client side: its events as a live progress bar (step,
loss, tokens/s, time left) and its loss curve as a PNG. Talks to a server through the official
`openai` client only; knows nothing of the store or the worker."""

from __future__ import annotations

import time
from pathlib import Path

from .lifecycle import FINISHED


def new_events(client, job_id: str, seen: set[str]) -> list:
    """Events not seen yet, oldest first (the API lists newest first; page back to the last seen)."""
    out, after = [], None
    while True:
        page = client.fine_tuning.jobs.list_events(job_id, limit=100, **({"after": after} if after else {}))
        fresh = [e for e in page.data if e.id not in seen]
        out += fresh
        if len(fresh) < len(page.data) or not page.has_more or not page.data:
            break
        after = page.data[-1].id
    seen.update(e.id for e in out)
    return out[::-1]


def by_step(metrics: list[dict]) -> list[dict]:
    """One entry per step, the latest (a step redone after a resume is reported twice)."""
    last = {m["step"]: m for m in metrics}
    return [last[s] for s in sorted(last)]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def follow(client, job_id: str, console=None, poll_s: float = 1.0):
    """Print the job's message events and drive a progress bar from its metrics events until it
    finishes. Returns (the finished job, its metrics, oldest first)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = console or Console()
    seen: set[str] = set()
    metrics: list[dict] = []
    rate_from: tuple[float, int] | None = None  # (when, tokens) at the first metrics seen here
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("left {task.fields[left]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("validating", total=None, loss="-", tps="-", left="-:--")
        while True:
            for e in new_events(client, job_id, seen):
                if e.type == "metrics" and e.data:
                    d = dict(e.data)
                    metrics.append(d)
                    tokens, now = d.get("trained_tokens") or 0, time.monotonic()
                    if rate_from is None or tokens < rate_from[1]:
                        rate_from = (now, tokens)
                    tps = (tokens - rate_from[1]) / (now - rate_from[0]) if now > rate_from[0] else None
                    world = d.get("world_size") or 1
                    bar.update(
                        task,
                        total=d["total_steps"],
                        completed=d["step"],
                        loss=f"{d['train_loss']:.4f}",
                        # tokens/s of all ranks together (trained_tokens counts the global batch)
                        tps=(f"{tps:,.0f}" if tps else "-") + (f" ({world} procs)" if world > 1 else ""),
                    )
                else:
                    bar.console.print(f"[dim]{time.strftime('%H:%M:%S', time.localtime(e.created_at))}[/] {e.message}")
            job = client.fine_tuning.jobs.retrieve(job_id)
            left = job.estimated_finish - time.time() if job.estimated_finish else None
            bar.update(task, description=job.status, left=_clock(left))
            if job.status in FINISHED:
                return job, by_step(metrics)
            time.sleep(poll_s)


def plot_loss_curve(metrics: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss (every step) and validation loss (where evaluated) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = by_step(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], label="train loss", lw=1.2)
    valid = [m for m in metrics if m.get("valid_loss") is not None]
    if valid:
        ax.plot([m["step"] for m in valid], [m["valid_loss"] for m in valid], "o-", label="valid loss", lw=1.2, ms=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per assistant token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
