"""The report directory: results.json (everything), report.md and report.html (the same tables),
learning_curve.png (accuracy and macro-F1 against labelled examples) and accuracy_latency.png.
Every number printed comes from results.json. Knows matplotlib and text; nothing of models.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

COLUMNS = [  # (header, key in a summary row, digits)
    ("accuracy", "accuracy", 3),
    ("macro-F1", "macro_f1", 3),
    ("ECE", "ece", 3),
    ("latency p50 ms", "latency_p50_ms", 1),
    ("latency p95 ms", "latency_p95_ms", 1),
    ("throughput /s", "throughput_per_s", 1),
    ("train s", "train_s", 1),
    ("peak memory MB", "peak_memory_mb", 0),
    ("size MB", "size_mb", 2),
]
REASONS = {"lora": "the fine-tuning jobs API needs at least 10 training examples (as OpenAI's)"}


def fmt(value, digits: int, std=None) -> str:
    if value is None:
        return "–"
    s = f"{value:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if std is not None else "")


def command(cfg: dict) -> str:
    """The `fundament eval` command line that makes this report (keys come from the environment)."""
    parts = [
        "fundament eval",
        *(f"--task {t}" for t in cfg["tasks"]),
        f"--strategies {','.join(cfg['strategies'])}",
        f"--sizes {','.join(map(str, cfg['sizes']))}",
        f"--seeds {','.join(map(str, cfg['seeds']))}",
    ]
    if cfg["limit"]:
        parts.append(f"--limit {cfg['limit']}")
    if cfg.get("vllm"):
        parts.append("--vllm")
    for flag, key, default in (
        ("--k", "k", 8),
        ("--example-format", "example_format", "list"),
        ("--model", "model", "smollm2-135m-instruct"),
        ("--embedding-model", "embedding_model", "all-minilm-l6-v2"),
        ("--remote-base-url", "remote_base_url", None),
        ("--remote-model", "remote_model", None),
        ("--lora-epochs", "lora_epochs", "auto"),
        ("--lora-r", "lora_r", None),
        ("--latency-sample", "latency_sample", 20),
    ):
        if cfg.get(key, default) != default:
            parts.append(f"{flag} {cfg[key]}")
    parts.append(f"--out {cfg['out']}")
    return " ".join(parts)


def table_rows(task: dict) -> list[list[str]]:
    """The main table of a task: one row per (strategy, size), in the strategies' order."""
    out = []
    for r in task["rows"]:
        seeds = len(r["seeds"])
        out.append(
            [r["strategy"], str(r["size"]), str(seeds)]
            + [fmt(r[k], d, r[k + "_std"] if seeds > 1 else None) for _, k, d in COLUMNS]
        )
    return out


def per_class_rows(task: dict) -> list[list[str]]:
    return [
        [r["strategy"], str(r["size"])] + [fmt(r["per_class_f1"][c], 3) for c in task["classes"]] for r in task["rows"]
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _test_words(name: str, t: dict) -> str:
    sample = (
        f"a seeded sample of {t['n_test']} of the {t['test_size']}"
        if t["n_test"] < t["test_size"]
        else f"all {t['test_size']}"
    )
    return f"test: {sample} {t['test_split']} examples; training subsets drawn from the {t['train_size']:,} of the train split"


KINDS = ("prompting", "fine-tuning", "probe", "from scratch")  # the verdict's order of summary.FAMILIES' kinds


def _row_words(r: dict) -> str:
    n = "no examples" if r["size"] == 0 else f"{r['size']:,} examples"
    lat = f", p50 {r['latency_p50_ms']:.0f} ms per example" if r.get("latency_p50_ms") is not None else ""
    train = f", {r['train_s']:.0f} s of training" if r.get("train_s") else ""
    return f"{r['strategy']}, {n}: accuracy {r['accuracy']:.3f}{lat}{train}"


def verdict_lines(v: dict) -> list[str]:
    """The verdict (summary.verdict) in words: which adaptation to use for this task."""
    if not v:
        return []
    best, fam = v["best"], v["families"]
    lines = [f"Best: {_row_words(best)}."]
    order = [f for f in KINDS if f in fam] + [f for f in fam if f not in KINDS]
    lines.append(
        "Best of each kind: "
        + "; ".join(f"{f}: {fam[f]['accuracy']:.3f} ({fam[f]['strategy']}, n={fam[f]['size']})" for f in order)
        + "."
    )
    o = v.get("fine_tuning_overtakes")
    if o:
        lines.append(
            f"Fine-tuning beats every prompt from {o['size']:,} labelled examples on: {o['strategy']} {o['accuracy']:.3f} against the best prompt's {o['best_prompt_accuracy']:.3f} (with as many examples or fewer)."
        )
    elif "fine-tuning" in fam and "prompting" in fam:
        lines.append("Fine-tuning never beat the best prompt at these sizes.")
    f = v["fastest_close_to_best"]
    if f != best:
        lines.append(f"Fastest within {v['close']:.2f} of the best accuracy: {_row_words(f)}.")
    scratch = fam.get("from scratch")
    if scratch:
        gap = best["accuracy"] - scratch["accuracy"]
        if gap <= v["close"]:
            lines.append(
                f"The small model trained from scratch comes within {v['close']:.2f} of the best ({scratch['strategy']} {scratch['accuracy']:.3f}): for this task it suffices, and a foundation model is not worth its cost."
            )
        else:
            lines.append(
                f"The small model trained from scratch reaches {scratch['accuracy']:.3f} ({scratch['strategy']}, n={scratch['size']:,}), {gap:.3f} below the best: here the foundation model is worth it."
            )
    return lines


def _sections(results: dict):
    """(title, intro lines, verdict lines, header, rows, per-class header, per-class rows, notes) per task."""
    for name, t in results["tasks"].items():
        m = t["majority"]
        intro = [
            _test_words(name, t) + ".",
            f"Always answering the most common class ({m['label']}): accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}.",
        ]
        notes = [
            f"{s} did not run at {', '.join(map(str, n))} examples: {REASONS.get(s, 'too few examples for it')}."
            for s, n in t["skipped"].items()
        ]
        notes += [
            f"{e['strategy']} n={e['size']} seed={e['seed']} failed: {e['error']}"
            for e in results["errors"]
            if e["task"] == name
        ]
        header = ["strategy", "n", "seeds"] + [h for h, _, _ in COLUMNS]
        yield (
            name,
            intro,
            verdict_lines(t.get("verdict") or {}),
            header,
            table_rows(t),
            ["strategy", "n"] + t["classes"],
            per_class_rows(t),
            notes,
        )


FAILED_HEADER = ["task", "strategy", "n", "seed", "error"]


def failed(results: dict) -> tuple[str, list[list[str]]]:
    """The cells that raised: a sentence and one row each (results["errors"]); ("", []) when none did."""
    errors = results.get("errors") or []
    if not errors:
        return "", []
    n = len(errors)
    words = (
        f"{n} of {n + results.get('cells', 0)} cells failed: they are missing from the tables and plots, and were not cached, "
        "so running the same command again retries them (and reads the others back)."
    )
    return words, [[e["task"], e["strategy"], str(e["size"]), str(e["seed"]), e["error"]] for e in errors]


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")  # one line, and a "|" in an error message does not split the row


def _machine_words(m: dict) -> str:
    load = (
        f", 1-minute load average {m['load_average']:.1f} while the cells ran (timings grow with it)"
        if m.get("load_average") is not None
        else ""
    )
    return f"Machine: {m.get('cpus', '?')} CPUs{load}."


def _measured() -> list[str]:
    return [
        "n: labelled training examples (seeded subsets of the train split, nested, one of each class first); 0 is zero-shot prompting of the base model.",
        "ECE: expected calibration error of the predicted label's probability (10 bins); – where a strategy gives no probabilities.",
        "latency: one example per call, sequentially, end to end from the text to the label (HTTP included for server strategies), on the first examples of the test set.",
        "throughput: test examples per second over the whole test set, classified the strategy's batched way (32 inputs per request for prompting and LoRA, one call for the scikit-learn models; probes include their feature extraction).",
        "train s: LoRA: the job's start event to its finish (the worker's own time, queue excluded); probes: extracting the training texts' features and fitting; TF-IDF: fitting.",
        "peak memory: the most resident memory training added to the process that trained (the fine-tuning worker for LoRA, this process otherwise; the frozen model's features are cached, so a probe counts only its fit), from /proc VmHWM reset at the start.",
        "size: what was trained, on disk: the LoRA adapter directory, or the pickled scikit-learn model.",
        "± is the standard deviation over seeds.",
    ]


def markdown(results: dict, images: dict[str, str]) -> str:
    cfg = results["config"]
    lines = [
        "# Evaluation: prompting vs fine-tuning vs a small custom model",
        "",
        f"Made by `{command(cfg)}` (finished {results['finished']}; the cells' compute time {results['cells_wall_s'] / 60:.1f} min; {_this_run(results)}).",
        "",
        f"Model: {cfg['model']} (prompted, fine-tuned, probed); embeddings: {cfg['embedding_model']}; k = {cfg['k']} examples for few-shot ({cfg.get('example_format', 'list')} format, docs/classification.md); seeds {', '.join(map(str, cfg['seeds']))}.",
        "",
        _machine_words(results.get("machine") or {}),
        "",
    ]
    words, rows = failed(results)
    if rows:
        lines += [
            "## Failed cells",
            "",
            words,
            "",
            _md_table(FAILED_HEADER, [[_md_cell(c) for c in r] for r in rows]),
            "",
        ]
    for title, image in images.items():
        lines += [f"## {title}", "", f"![{title}]({image})", ""]
    for name, intro, verdict, header, rows, pc_header, pc_rows, notes in _sections(results):
        lines += [f"## {name}", "", *(f"{x}" for x in intro), ""]
        lines += ["Which adaptation wins:", "", *(f"- {x}" for x in verdict), ""] if verdict else []
        lines += [_md_table(header, rows), "", "Per-class F1:", "", _md_table(pc_header, pc_rows), ""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Strategies", ""] + [f"- **{k}**: {v}" for k, v in results["strategies"].items()] + [""]
    lines += ["## How it is measured", ""] + [f"- {x}" for x in _measured()] + [""]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def html_page(results: dict, images: dict[str, str]) -> str:
    cfg = results["config"]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>fundament eval</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        "<h1>Evaluation: prompting vs fine-tuning vs a small custom model</h1>",
        f"<p>Made by <code>{html.escape(command(cfg))}</code> (finished {results['finished']}).</p>",
        f"<p>{html.escape(_machine_words(results.get('machine') or {}))}</p>",
    ]
    words, rows = failed(results)
    if rows:
        parts += ["<h2>Failed cells</h2>", f"<p>{html.escape(words)}</p>", _html_table(FAILED_HEADER, rows)]
    for title, image in images.items():
        parts += [f"<h2>{html.escape(title)}</h2>", f"<img src='{image}' alt='{html.escape(title)}'>"]
    for name, intro, verdict, header, rows, pc_header, pc_rows, notes in _sections(results):
        parts += [f"<h2>{html.escape(name)}</h2>"] + [f"<p>{html.escape(x)}</p>" for x in intro]
        parts += (
            ["<p>Which adaptation wins:</p><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in verdict) + "</ul>"]
            if verdict
            else []
        )
        parts += [_html_table(header, rows), "<p>Per-class F1:</p>", _html_table(pc_header, pc_rows)]
        parts += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"] if notes else []
    parts += (
        ["<h2>Strategies</h2><ul>"]
        + [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in results["strategies"].items()]
        + ["</ul>"]
    )
    parts += ["<h2>How it is measured</h2><ul>"] + [f"<li>{html.escape(x)}</li>" for x in _measured()] + ["</ul>"]
    return "\n".join(parts)


def write_report(results: dict, out: Path) -> Path:
    from .plots import plot_accuracy_latency, plot_learning_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    images = {
        "Learning curves": plot_learning_curves(results, out / "learning_curve.png").name,
        "Accuracy against latency": plot_accuracy_latency(results, out / "accuracy_latency.png").name,
    }
    (out / "report.md").write_text(markdown(results, images))
    (out / "report.html").write_text(html_page(results, images))
    return out / "report.md"


def _this_run(results: dict) -> str:
    """What the last invocation did: a rerun reads finished cells back from the cache."""
    total, computed = results.get("cells"), results.get("cells_computed")
    failed = f"; {results['cells_failed']} failed (see Failed cells)" if results.get("cells_failed") else ""
    if total is None or computed == total:
        return f"this run's wall time {results['wall_s'] / 60:.1f} min{failed}"
    if not computed:
        return f"all {total} cells read back from the cache{failed}"
    return f"this run computed {computed} of {total} cells in {results['wall_s'] / 60:.1f} min, the rest read back from the cache{failed}"
