"""A stat cache for content hashes: (path, size, mtime, inode) -> sha256, in SQLite.

A rerun of ingest re-reads only files whose stat changed; a million unchanged files cost a
million stat calls, not a million reads. It is a cache: deleting it only costs time.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tlflow.tasks.lib.core.files import sha256_file

_SCHEMA = """CREATE TABLE IF NOT EXISTS hashes (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ino INTEGER, sha256 TEXT)"""


class HashCache:
    """sha256 of files, recomputed only when a file's size, mtime or inode changed."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.reads = path, 0
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError:  # a corrupt cache is rebuilt, never trusted
            path.unlink()
            self._db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path)
        db.execute(_SCHEMA)
        return db

    def sha256(self, file: Path) -> str:
        """The file's sha256, from the cache when its stat is unchanged."""
        st, key = file.stat(), str(file.resolve())
        row = self._db.execute(
            "SELECT sha256 FROM hashes WHERE path=? AND size=? AND mtime_ns=? AND ino=?",
            (key, st.st_size, st.st_mtime_ns, st.st_ino),
        ).fetchone()
        if row:
            return row[0]
        digest = sha256_file(file)
        self.reads += 1
        self._db.execute(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
            (key, st.st_size, st.st_mtime_ns, st.st_ino, digest),
        )
        return digest

    def close(self) -> None:
        self._db.commit()
        self._db.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

