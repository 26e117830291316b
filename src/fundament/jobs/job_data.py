"""A fine-tuning job's own copy of its training and validation files, in <out_dir>/data/.

Made when the job is created, read by validation, training and every resume, and dropped when the
job ends. So a job never depends on an uploaded file after it was created: deleting that file
(allowed at any time, as OpenAI allows it) leaves the job whole, even across a worker restart.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: the store's lifecycle drops job files, and files.py imports the store
    from .files import FileStore

PARAMS = ("training_file", "validation_file")


def data_path(out_dir: str | Path, param: str) -> Path:
    """Where the job's copy of its `training_file` or `validation_file` lives."""
    return Path(out_dir) / "data" / f"{param}.jsonl"


def keep_job_files(files: FileStore, out_dir: str | Path, file_ids: dict[str, str | None]) -> dict[str, Path]:
    """Copy (hard-link) each named file that has no copy yet into the job's data directory. The
    copies by param; a file deleted before it could be copied is left out."""
    out = {}
    for param in PARAMS:
        file_id = file_ids.get(param)
        if not file_id:
            continue
        dest = data_path(out_dir, param)
        if not dest.exists():
            try:
                files.keep(file_id, dest)
            except FileNotFoundError:
                continue
        out[param] = dest
    return out


def drop_job_files(out_dir: str | Path) -> None:
    """Remove the job's copies (the job has ended), and its directory if nothing else is in it."""
    shutil.rmtree(Path(out_dir) / "data", ignore_errors=True)
    try:
        Path(out_dir).rmdir()  # a job that never trained leaves nothing behind
    except OSError:
        pass
