"""The manifest: one row per image (relpath under the snapshot, sha256 of the bytes, label,
split). Written by ingest, read by every stage after it; this module is its one owner."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tlflow.tasks.lib.core.errors import handoff_error
from tlflow.tasks.lib.core.files import atomic_path

SPLITS = ("train", "val", "test")
COLUMNS = ("relpath", "sha256", "label", "split")


@dataclass(frozen=True)
class Row:
    """One manifest row."""

    relpath: str
    sha256: str
    label: str
    split: str


def write_manifest(rows: list[Row], dest: Path) -> None:
    """Write the manifest CSV atomically."""
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows((r.relpath, r.sha256, r.label, r.split) for r in rows)


def read_manifest(path: Path) -> list[Row]:
    """Read the manifest; a missing or malformed one is an error naming it and ingest."""
    if not path.is_file():
        raise handoff_error(path, "ingest")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise handoff_error(path, "ingest", f"expected the columns {list(COLUMNS)}")
        rows = [Row(r["relpath"], r["sha256"], r["label"], r["split"]) for r in reader]
    if any(r.split not in SPLITS or not r.sha256 for r in rows):
        raise handoff_error(path, "ingest", "a row has no sha256 or an unknown split")
    return rows


def without(rows: list[Row], bad: set[str] | dict[str, str]) -> list[Row]:
    """The rows whose image hash is not in `bad` (the images extract could not read)."""
    return [r for r in rows if r.sha256 not in bad]


def of_split(rows: list[Row], split: str) -> list[Row]:
    """The rows of one split, in manifest order."""
    return [r for r in rows if r.split == split]
