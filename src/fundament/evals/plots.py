"""The report's two figures, one panel per task, from results.json's numbers: learning curves
(accuracy and macro-F1 against labelled training examples, error bars over seeds) and accuracy
against per-example latency. matplotlib, written as PNG.
"""

from __future__ import annotations

from pathlib import Path

STYLE = {  # colour and marker per strategy, the same in both figures
    "zero-shot": ("#7f7f7f", "o"),
    "few-shot-random": ("#1f77b4", "o"),
    "few-shot-nearest": ("#17becf", "s"),
    "lora": ("#d62728", "D"),
    "probe-embedding": ("#2ca02c", "^"),
    "probe-hidden": ("#98df8a", "v"),
    "tfidf": ("#ff7f0e", "P"),
    "remote-zero-shot": ("#9467bd", "o"),
    "remote-few-shot-random": ("#9467bd", "x"),
    "remote-few-shot-nearest": ("#c5b0d5", "*"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(fig, ax, n_panels: int, height_in: float) -> None:
    """One legend for the figure, below the panels, as many columns as fit."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = max(1, min(len(labels), 3 * n_panels))
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, (0.25 * rows + 0.1) / height_in, 1, 1))


def plot_learning_curves(results: dict, path: Path) -> Path:
    plt = _pyplot()
    tasks = results["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.2 * len(tasks), 7.5), dpi=110, squeeze=False)
    for col, (name, t) in enumerate(tasks.items()):
        sizes = sorted({p["size"] for c in t["curves"].values() for p in c} | {0})
        for row, (metric, label) in enumerate((("accuracy", "accuracy"), ("macro_f1", "macro-F1"))):
            ax = axes[row][col]
            ax.axhline(t["majority"][metric], color="#bbbbbb", ls=":", lw=1, label="majority class")
            for strategy, pts in t["curves"].items():
                if not pts:
                    continue
                color, marker = STYLE.get(strategy, ("black", "o"))
                if strategy == "zero-shot":  # one point: drawn as a level to compare against
                    ax.axhline(pts[0][metric], color=color, ls="--", lw=1)
                xs, ys = [p["size"] for p in pts], [p[metric] for p in pts]
                err = [p[metric + "_std"] or 0 for p in pts]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err if any(err) else None,
                    color=color,
                    marker=marker,
                    ms=5,
                    lw=1.4,
                    capsize=3,
                    label=strategy,
                )
            ax.set_xscale("symlog", linthresh=8)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.set_xlim(-0.5, max(sizes) * 1.3 if max(sizes) else 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.set_xlabel("labelled training examples")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label} (test n={t['n_test']})")
    _legend(fig, axes[0][0], len(tasks), 7.5)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_latency(results: dict, path: Path) -> Path:
    """Each strategy at each size: accuracy against median latency per example (log scale), the
    points of one strategy joined in order of size and marked with it."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.8), dpi=110, squeeze=False)
    for col, (name, t) in enumerate(tasks.items()):
        ax = axes[0][col]
        ax.axhline(t["majority"]["accuracy"], color="#bbbbbb", ls=":", lw=1, label="majority class")
        for strategy in t["curves"]:
            own = sorted(
                (r for r in t["rows"] if r["strategy"] == strategy and r["latency_p50_ms"] is not None),
                key=lambda r: r["size"],
            )
            if not own:
                continue
            color, marker = STYLE.get(strategy, ("black", "o"))
            xs, ys = [r["latency_p50_ms"] for r in own], [r["accuracy"] for r in own]
            ax.plot(xs, ys, color=color, marker=marker, ms=5, lw=0.8, alpha=0.85, label=strategy)
            for r, x, y in zip(own, xs, ys):
                ax.annotate(str(r["size"]), (x, y), fontsize=6, color=color, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("latency per example, p50 (ms, log scale)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: accuracy against latency (labels: n)")
    _legend(fig, axes[0][0], len(tasks), 4.8)
    fig.savefig(path)
    plt.close(fig)
    return path
