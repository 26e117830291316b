"""Labelled classification tasks read from the shared data directory: SST-2 (binary sentiment),
TREC (6 coarse question classes) and SMS spam. Each task names its classes in the words a prompt
shows the model, an instruction, and its train and test splits. Knows files and labels; nothing
of models or prompts beyond those words.

The data directory is `$FUNDAMENT_DATA`, else `../shared/data` beside the repository checkout;
each dataset's PROVENANCE.md there records where its files came from and their checksums.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequestError

SMS_SPLIT_SEED = 0  # the SMS spam collection has no official split: ours is a seeded 80/20 shuffle
SMS_TRAIN_FRACTION = 0.8


@dataclass
class Example:
    text: str
    label: str  # one of its task's classes


@dataclass
class Task:
    name: str
    classes: list[str]  # in the words a prompt uses for them
    instruction: str
    answer_prefix: str  # how the model's answer starts before the label
    train: list[Example]
    test: list[Example]
    test_split: str  # what `test` is, e.g. "dev" for SST-2 (its test labels are not public)
    descriptions: dict[str, str] | None = None  # optional, per class
    input_prefix: str = ""  # what introduces the input in a prompt, e.g. "Review:"


def data_dir() -> Path:
    env = os.environ.get("FUNDAMENT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _missing(path: Path) -> InvalidRequestError:
    return InvalidRequestError(
        f"{path} does not exist; set FUNDAMENT_DATA to the data directory (see its PROVENANCE.md files).", "data"
    )


def _read_sst2(path: Path) -> list[Example]:
    """GLUE's SST-2 TSV: a header naming `sentence` and `label` (0 negative, 1 positive)."""
    if not path.exists():
        raise _missing(path)
    names = {"0": "negative", "1": "positive"}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.strip() for h in next(rows, [])]
        for col in ("sentence", "label"):
            if col not in header:
                raise InvalidRequestError(f"{path} line 1: no '{col}' column (the header has {header}).", "data")
        si, li = header.index("sentence"), header.index("label")
        out = []
        for n, row in enumerate(rows, 2):
            if len(row) != len(header):
                raise InvalidRequestError(f"{path} line {n}: {len(row)} columns, the header has {len(header)}.", "data")
            label = row[li].strip()
            if label not in names:
                raise InvalidRequestError(
                    f"{path} line {n}: unknown label {label!r}; SST-2 labels are 0 and 1.", "data"
                )
            out.append(Example(row[si].strip(), names[label]))
    return out


TREC_CLASSES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


def _read_trec(path: Path) -> list[Example]:
    """Li & Roth's `COARSE:fine question` lines; the coarse class is the label. Latin-1: the
    training file holds one 0xF0 byte (see its PROVENANCE.md)."""
    if not path.exists():
        raise _missing(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        head, _, text = line.partition(" ")
        coarse = head.split(":")[0]
        if ":" not in head or not text.strip():
            raise InvalidRequestError(f"{path} line {n}: expected 'COARSE:fine question', got {line[:60]!r}.", "data")
        if coarse not in TREC_CLASSES:
            raise InvalidRequestError(
                f"{path} line {n}: unknown label {coarse!r}; TREC's coarse classes are {sorted(TREC_CLASSES)}.", "data"
            )
        out.append(Example(text.strip(), TREC_CLASSES[coarse]))
    return out


SMS_CLASSES = {"ham": "legitimate", "spam": "spam"}  # the data's "ham" is jargon the model does not know


def _read_sms(path: Path) -> list[Example]:
    """`ham|spam<TAB>message` lines; ham is named "legitimate" (zero-shot macro-F1 0.11 as "ham",
    0.58 as "legitimate"; k = 8 nearest 92% -> 98.5% accuracy, on 200-400 test messages)."""
    if not path.exists():
        raise _missing(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise InvalidRequestError(f"{path} line {n}: no tab between the label and the message.", "data")
        if label not in ("ham", "spam"):
            raise InvalidRequestError(
                f"{path} line {n}: unknown label {label!r}; SMS spam labels are ham and spam.", "data"
            )
        out.append(Example(text.strip(), SMS_CLASSES[label]))
    return out


def sms_split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Shuffle the indices with random.Random(SMS_SPLIT_SEED), then the first 80% are train, the
    rest test (on the 5,574 messages: 4,459 train, 1,115 test)."""
    order = list(range(len(examples)))
    random.Random(SMS_SPLIT_SEED).shuffle(order)
    cut = int(len(order) * SMS_TRAIN_FRACTION)
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


def load_task(name: str, root: Path | None = None) -> Task:
    root = Path(root) if root else data_dir()
    if name == "sst2":
        return Task(
            "sst2",
            ["negative", "positive"],
            "Classify the sentiment of the movie review.",
            "The review is",
            _read_sst2(root / "sst2" / "train.tsv"),
            _read_sst2(root / "sst2" / "dev.tsv"),
            "dev",
            input_prefix="Review:",
        )
    if name == "trec":
        return Task(
            "trec",
            list(TREC_CLASSES.values()),
            "Classify what kind of answer the question asks for.",
            "The question asks for",
            _read_trec(root / "trec" / "train_5500.label"),
            _read_trec(root / "trec" / "TREC_10.label"),
            "test",
            descriptions={
                "abbreviation": "an abbreviation or what one stands for",
                "description": "a description, definition, manner or reason",
                "entity": "a thing: an animal, color, food, product, term, ...",
                "human": "a person or a group of people",
                "location": "a place: a city, country, mountain, ...",
                "number": "a number: a count, date, distance, price, ...",
            },
            input_prefix="Question:",
        )
    if name == "sms_spam":
        train, test = sms_split(_read_sms(root / "sms_spam" / "SMSSpamCollection"))
        return Task(
            "sms_spam",
            list(SMS_CLASSES.values()),
            "Is this text message spam (advertising, prizes, scams) or a legitimate message?",
            "This message is",
            train,
            test,
            "test (seeded 20%)",
            input_prefix="Message:",
        )
    raise InvalidRequestError(f"unknown task {name!r}; known: {', '.join(TASKS)}.", "task")


TASKS = ("sst2", "trec", "sms_spam")
