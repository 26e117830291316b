"""A classification task defined by the user: a YAML or JSON definition naming data files (JSONL,
CSV or TSV), the columns that hold the text and the label, the labels (with optional
descriptions) and the splits. Every problem is an InvalidRequestError naming the file, the line
and the column. Knows files and labels; built-in tasks live in tasks.py.

    name: reviews
    instruction: Classify the sentiment of the review.
    answer_prefix: The review is          # optional (default "Answer:")
    text_column: text                     # default "text"
    label_column: label                   # default "label"
    labels: {positive: a favourable review, negative: an unfavourable review}   # or a list of names
    label_map: {"1": positive, "0": negative}   # optional: raw values in the file -> label names
    splits: {train: train.jsonl, test: test.csv}   # paths relative to this file
    # or one file split by a seeded shuffle:  file: all.tsv, test_fraction: 0.2, split_seed: 0
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import yaml

from ..errors import InvalidRequestError
from .tasks import TASKS, Example, Task, load_task

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
KNOWN_KEYS = {
    "name",
    "instruction",
    "answer_prefix",
    "text_column",
    "label_column",
    "labels",
    "label_map",
    "splits",
    "file",
    "test_fraction",
    "split_seed",
    "test_split",
}


def _fail(message: str, param: str = "task") -> InvalidRequestError:
    return InvalidRequestError(message, param)


def read_rows(path: Path, columns: tuple[str, str]) -> list[tuple[int, str, str]]:
    """(line number, text, raw label) for every record of a JSONL, CSV or TSV file."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise _fail(f"{path}: unknown format {path.suffix!r}; use .jsonl, .csv or .tsv.")
    if not path.is_file():
        raise _fail(f"{path}: no such file.")
    text_col, label_col = columns
    raw = path.read_text(encoding="utf-8")
    out = []
    if fmt == "jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(f"{path} line {n}: not JSON ({e.msg}).") from None
            if not isinstance(record, dict):
                raise _fail(f"{path} line {n}: expected a JSON object, got {type(record).__name__}.")
            for col in columns:
                if col not in record:
                    raise _fail(f"{path} line {n}: no '{col}' column (the record has {sorted(record)}).")
            out.append((n, str(record[text_col]), str(record[label_col])))
        return out
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    header = [h.strip() for h in next(reader, [])]
    for col in columns:
        if col not in header:
            raise _fail(f"{path} line 1: no '{col}' column (the header has {header}).")
    ti, li = header.index(text_col), header.index(label_col)
    for row in reader:
        n = reader.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise _fail(f"{path} line {n}: {len(row)} columns, the header has {len(header)}.")
        out.append((n, row[ti], row[li]))
    return out


def _labels(defn: dict, where: Path) -> tuple[list[str], dict[str, str] | None]:
    labels = defn.get("labels")
    if isinstance(labels, dict):
        names, descriptions = [str(k) for k in labels], {str(k): str(v) for k, v in labels.items() if v}
    elif isinstance(labels, list) and all(isinstance(x, (str, int)) for x in labels):
        names, descriptions = [str(x) for x in labels], {}
    else:
        raise _fail(f"{where}: 'labels' must list the label names, or map each name to a description.")
    if len(names) < 2 or len(set(names)) != len(names):
        raise _fail(f"{where}: 'labels' must name at least two distinct labels, got {names}.")
    return names, descriptions or None


def _examples(path: Path, defn: dict, names: list[str]) -> list[Example]:
    columns = (str(defn.get("text_column", "text")), str(defn.get("label_column", "label")))
    label_map = {str(k): str(v) for k, v in (defn.get("label_map") or {}).items()}
    out = []
    for n, text, raw in read_rows(path, columns):
        label = label_map.get(raw.strip(), raw.strip())
        if label not in names:
            raise _fail(
                f"{path} line {n}, column '{columns[1]}': unknown label {raw!r}; the task's labels are {names}"
                + (" (after label_map)." if label_map else ".")
            )
        if not text.strip():
            raise _fail(f"{path} line {n}, column '{columns[0]}': the text is empty.")
        out.append(Example(text.strip(), label))
    return out


def load_task_file(path: str | Path) -> Task:
    """The Task a YAML or JSON definition file describes."""
    path = Path(path)
    if not path.is_file():
        raise _fail(f"{path}: no such task file (and not a built-in task: {', '.join(TASKS)}).")
    try:
        defn = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise _fail(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(defn, dict):
        raise _fail(f"{path}: expected a mapping of settings at the top level.")
    unknown = sorted(set(defn) - KNOWN_KEYS)
    if unknown:
        raise _fail(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(KNOWN_KEYS))}.")
    names, descriptions = _labels(defn, path)
    base = path.parent
    if "splits" in defn:
        splits = defn["splits"]
        if not isinstance(splits, dict) or set(splits) != {"train", "test"}:
            raise _fail(f"{path}: 'splits' must name exactly a train and a test file, got {splits!r}.")
        train, test = (_examples(base / str(splits[s]), defn, names) for s in ("train", "test"))
        where = {s: base / str(splits[s]) for s in ("train", "test")}
    elif "file" in defn:
        examples = _examples(base / str(defn["file"]), defn, names)
        fraction = float(defn.get("test_fraction", 0.2))
        if not 0 < fraction < 1:
            raise _fail(f"{path}: test_fraction must be between 0 and 1, got {fraction}.")
        order = list(range(len(examples)))
        random.Random(int(defn.get("split_seed", 0))).shuffle(order)
        cut = len(order) - round(len(order) * fraction)
        train, test = [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]
        where = {s: base / str(defn["file"]) for s in ("train", "test")}
    else:
        raise _fail(f"{path}: give 'splits' (a train and a test file) or 'file' (split by test_fraction).")
    for split, examples in (("train", train), ("test", test)):
        if not examples:
            raise _fail(f"{path}: the {split} split ({where[split]}) has no examples.")
    return Task(
        str(defn.get("name") or path.stem),
        names,
        str(defn.get("instruction") or "Classify the input."),
        str(defn.get("answer_prefix", "Answer:")),
        train,
        test,
        str(defn.get("test_split", "test")),
        descriptions,
    )


def resolve_task(spec: str, data_root: Path | None = None) -> Task:
    """A built-in task by name (sst2, trec, sms_spam), else a task definition file by path."""
    if spec in TASKS:
        return load_task(spec, data_root)
    return load_task_file(spec)
