"""Results on disk, one JSON file per (task, strategy, size, seed), named with a hash of everything
the result depends on (the examples, the test sample, the strategy's settings), so a rerun
computes only what changed. Written atomically: an interrupted run leaves no half file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


class ResultCache:
    def __init__(self, root: Path):
        self.root = Path(root) / "results"

    def path(self, task: str, strategy: str, size: int, seed: int, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task)
        return self.root / safe / strategy / f"n{size}-s{seed}-{key}.json"

    def get(self, *cell) -> dict | None:
        p = self.path(*cell)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:  # damaged: computed again
            return None

    def put(self, record: dict, *cell) -> None:
        p = self.path(*cell)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, p)
