"""File bytes under $FUNDAMENT_HOME/files/, one file per id, their rows in the JobStore.

An upload is written to a temporary file in the same directory, fsynced and renamed into place,
and only then gets its row: an upload cut off half-way leaves neither bytes nor row. Knows nothing
of HTTP or multipart; the server feeds it bytes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..config import fundament_home
from ..errors import PayloadTooLargeError
from .store import JobStore, new_id

_TMP = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Upload:
    """One file being written: `write` chunks, then `commit` (row created) or `abort` (nothing left)."""

    def __init__(self, files: FileStore):
        self.files = files
        self.id = new_id("file")
        self.tmp = files.dir / f"{_TMP}{self.id}"
        self.f = open(self.tmp, "wb")
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self.files.max_bytes:
            self.abort()
            raise PayloadTooLargeError(
                f"The file is larger than the server's limit of {self.files.max_bytes} bytes (max_file_bytes).", "file"
            )
        self.f.write(data)

    def commit(self, filename: str, purpose: str) -> dict:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.files.path(self.id))
            _fsync_dir(self.files.dir)
            return self.files.store.add_file(self.id, filename, purpose, self.bytes)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.f.close()
        for p in (self.tmp, self.files.path(self.id)):
            p.unlink(missing_ok=True)


class FileStore:
    def __init__(self, store: JobStore, root: str | Path | None = None, max_bytes: int = 512 * 1024 * 1024):
        self.store = store
        self.dir = Path(root) if root else fundament_home() / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def begin(self) -> Upload:
        return Upload(self)

    def add_bytes(self, data: bytes, filename: str, purpose: str) -> dict:
        """Store bytes the server or worker made itself (a result file), as atomically as an upload."""
        up = self.begin()
        up.write(data)
        return up.commit(filename, purpose)

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def keep(self, file_id: str, dest: Path) -> Path:
        """Give `dest` this file's bytes for good, so that deleting the file later leaves them: a
        hard link (stored bytes are never rewritten, only replaced, so a link is a copy that costs
        no space until the file is deleted), or a copy where a link cannot be made (another
        filesystem). Written under a temporary name and renamed; FileNotFoundError if the file is gone."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{_TMP}{dest.name}-{new_id('k')}")
        try:
            try:
                os.link(self.path(file_id), tmp)
            except FileNotFoundError:
                raise
            except OSError:  # EXDEV, or a filesystem without hard links
                shutil.copyfile(self.path(file_id), tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def delete(self, file_id: str) -> bool:
        """Drop the row, then the bytes; False if there was no such file."""
        if not self.store.delete_file(file_id):
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True

    def sweep(self, min_age_s: float = 60.0) -> list[str]:
        """Remove what a killed process left: temporary files, and bytes that never got a row.
        Only things older than min_age_s, so a write in progress elsewhere is left alone."""
        live = self.store.file_ids()
        removed, cutoff = [], time.time() - min_age_s
        for p in self.dir.iterdir():
            if p.name in live or not p.is_file():
                continue
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed.append(p.name)
            except FileNotFoundError:
                pass
        return removed
