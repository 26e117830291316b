"""What one strategy run yields (predictions, probabilities, timings, memory, size) and the
measuring behind it: per-example latency, a process's peak resident memory, bytes on disk.
Linux /proc for memory; knows nothing of models.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Outcome:
    labels: list[str]  # predicted, one per test example ("" when a reply named no label)
    probabilities: list[dict[str, float]] | None  # one per test example, or None when not available
    latencies_s: list[float]  # seconds for single examples, one call each, on a sample of the test split
    predict_s: float  # wall time to classify the whole test split the strategy's fastest way (batched)
    train_s: float | None = None  # wall time of training (fine-tuning, fitting, feature extraction)
    peak_memory_mb: float | None = None  # see PeakMemory
    size_bytes: int | None = None  # what was trained, on disk
    info: dict = field(default_factory=dict)  # strategy-specific: job id, model id, k, fallbacks

    def to_dict(self) -> dict:
        return asdict(self)


def _status_kb(pid: int | str, key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def resident_kb(pid: int | str = "self") -> int | None:
    return _status_kb(pid, "VmRSS")


class PeakMemory:
    """The most resident memory a process gained while a block ran: its high-water mark (VmHWM,
    reset at the start by writing 5 to /proc/PID/clear_refs) minus its resident memory (VmRSS) at
    the start, or minus `baseline_kb` when given (a long-lived worker's idle size, so a job is not
    let off what an earlier job left resident). What the process held before (interpreter,
    libraries, models loaded earlier) is not counted. `mb` stays None where /proc cannot tell."""

    def __init__(self, pid: int | str = "self", baseline_kb: int | None = None):
        self.pid, self.baseline_kb = pid, baseline_kb
        self.mb: float | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._start = self.baseline_kb or _status_kb(self.pid, "VmRSS")
        except OSError:
            self._start = None
        return self

    def read(self) -> float | None:
        hwm = _status_kb(self.pid, "VmHWM")
        if self._start is None or hwm is None:
            return None
        return max(hwm - self._start, 0) / 1024

    def __exit__(self, *exc) -> None:
        self.mb = self.read()


def time_each(fn, items: list) -> list[float]:
    """Seconds for fn(item), one call per item, in order."""
    out = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def dir_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (from /proc/PID/task/*/children)."""
    out = []
    for t in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(x) for x in t.read_text().split()]
        except OSError:
            pass
    return out
