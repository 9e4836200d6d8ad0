"""Image sources and the snapshot: what ingest reads and how it mirrors it under data/images.

Sources: `digits` (scikit-learn's bundled 8x8 digits written out as PNG files, the embedded
default), `folder` (root/<class>/<image>, or root/train|val|test/<class>/<image>) and `csv`
(path,label[,split], paths relative to the CSV). Splits not given by the source are drawn
from each image's content hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from tasks.lib.errors import TlflowError
from tasks.lib.files import atomic_path, sha256_bytes
from tasks.lib.hashcache import HashCache
from tasks.lib.images import IMAGE_SUFFIXES
from tasks.lib.manifest import SPLITS, Row
from tasks.lib.params import Ingest


@dataclass(frozen=True)
class Item:
    """One source image: where its bytes come from, where the snapshot keeps them, its label."""

    relpath: str  # posix path under the snapshot folder
    label: str
    split: str | None  # given by the source, or None to assign by hash
    src: Path | None = None  # file to copy; None when `data` holds the bytes
    data: bytes | None = None


# ---------------------------------------------------------------- pure core


def assign_split(sha256: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of an image as a stable function of its content hash and the seed.

    Each image draws a uniform number from sha256(seed, content hash), so adding images never
    moves old ones, duplicates always share a split, and every class is split in the given
    proportions in expectation (stratified by construction: the draw is independent of label).
    """
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def build_manifest(
    hashed: list[tuple[Item, str]], cfg: Ingest, seed: int
) -> list[Row]:
    """Manifest rows sorted by relpath; splits not given by the source are drawn by hash.

    When the source gives a test split but no val split (hymenoptera's train/ + val/), only
    val is carved out of train; when it gives train only, both are carved.
    """
    given = {it.split for it, _ in hashed if it.split}
    val_f = 0.0 if "val" in given else cfg.val_fraction
    test_f = 0.0 if "test" in given else cfg.test_fraction
    rows = []
    for item, sha in hashed:
        split = item.split if item.split in ("val", "test") else None
        split = split or assign_split(sha, seed, val_f, test_f)
        rows.append(Row(item.relpath, sha, item.label, split))
    rows.sort(key=lambda r: r.relpath)
    _check_splits(rows)
    return rows


def _check_splits(rows: list[Row]) -> None:
    """Every class needs training images, there must be at least two classes, and a test
    split (evaluate scores on it): caught here, before any stage has spent time."""
    if not rows:
        raise TlflowError("ingest: the source holds no images")
    labels = sorted({r.label for r in rows})
    if len(labels) < 2:
        raise TlflowError(f"ingest: need at least 2 classes, found {labels}")
    train = Counter(r.label for r in rows if r.split == "train")
    missing = [lab for lab in labels if train[lab] == 0]
    if missing:
        raise TlflowError(
            f"ingest: label(s) {missing} have no image in the train split "
            "(add images, or lower val_fraction / test_fraction)"
        )
    if not any(r.split == "test" for r in rows):
        raise TlflowError(
            "ingest: the test split is empty and evaluate needs one "
            "(set ingest.test_fraction above 0, or give the source a test split)"
        )


# ---------------------------------------------------------------- sources


def digits_items() -> list[Item]:
    """scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as PNG bytes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    items = []
    for i, (img, target) in enumerate(zip(pixels, digits.target, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        items.append(Item(f"{target}/{i:04d}.png", str(target), None, data=buf.getvalue()))
    return items


def _class_images(class_dir: Path, root: Path, split: str | None) -> list[Item]:
    files = sorted(
        p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise TlflowError(f"ingest: class folder {class_dir} holds no images "
                          f"(expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [
        Item(p.relative_to(root).as_posix(), class_dir.name, split, src=p) for p in files
    ]


def _class_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise TlflowError(
            f"ingest: {folder} has no class folders (expected {folder}/<class>/<image>)"
        )
    return dirs


def folder_items(root: Path) -> list[Item]:
    """root/<class>/<image>, or root/train|val|test/<class>/<image> when already split."""
    if not root.is_dir():
        raise TlflowError(f"ingest.path: folder {root} does not exist")
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in split_dirs:
        return [it for d in _class_dirs(root) for it in _class_images(d, root, None)]
    # hymenoptera layout: train/ and val/ but no test/ -> val/ is the held-out test set
    names = {"train": "train", "val": "val", "test": "test"}
    if "test" not in split_dirs and "val" in split_dirs:
        names["val"] = "test"
    return [
        it
        for s in split_dirs
        for d in _class_dirs(root / s)
        for it in _class_images(d, root, names[s])
    ]


def csv_items(csv_path: Path) -> list[Item]:
    """Rows path,label[,split]; paths are relative to the CSV's folder."""
    if not csv_path.is_file():
        raise TlflowError(f"ingest.path: CSV file {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise TlflowError(
                f"{csv_path}: missing column(s) {sorted(missing)}; expected path,label[,split]"
            )
        return [_csv_item(csv_path, n, row) for n, row in enumerate(reader, start=2)]


def _csv_item(csv_path: Path, line: int, row: dict[str, str]) -> Item:
    where = f"{csv_path}:{line}"
    rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
    split = (row.get("split") or "").strip() or None
    if not label:
        raise TlflowError(f"{where}: empty label for {rel!r}")
    if split not in (None, *SPLITS):
        raise TlflowError(f"{where}: unknown split {split!r}; expected one of {list(SPLITS)}")
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts:
        raise TlflowError(f"{where}: path {rel!r} must be relative to the CSV, without '..'")
    src = csv_path.parent / pure
    if not src.is_file():
        raise TlflowError(f"{where}: image {src} does not exist")
    return Item(pure.as_posix(), label, split, src=src)


def check_csv_labels(items: list[Item], csv_path: Path) -> None:
    """A label given only to val/test rows is unknown to the classifier: refuse it."""
    train_labels = {it.label for it in items if it.split in (None, "train")}
    for it in items:
        if it.label not in train_labels:
            raise TlflowError(
                f"{csv_path}: label {it.label!r} of {it.relpath} is unknown: no train row has it"
            )


def source_items(cfg: Ingest) -> list[Item]:
    """The items of the configured source."""
    if cfg.source == "digits":
        return digits_items()
    if cfg.path is None:
        raise TlflowError(f"ingest.path: required when ingest.source is {cfg.source!r}")
    if cfg.source == "folder":
        return folder_items(cfg.path)
    items = csv_items(cfg.path)
    check_csv_labels(items, cfg.path)
    return items


# ---------------------------------------------------------------- shell


def snapshot(items: list[Item], images_dir: Path, cache: HashCache) -> list[tuple[Item, str]]:
    """Mirror the items under images_dir, copying only what changed; return their hashes.

    Unchanged files are neither copied nor re-read: their stat finds the hash in the cache.
    """
    hashed = []
    for it in items:
        dest = images_dir / it.relpath
        if it.data is not None:
            sha = sha256_bytes(it.data)
            if not dest.is_file() or cache.sha256(dest) != sha:
                with atomic_path(dest) as tmp:
                    tmp.write_bytes(it.data)
        else:
            if not _same_file(it.src, dest):
                with atomic_path(dest) as tmp:
                    shutil.copy2(it.src, tmp)
            sha = cache.sha256(dest)
        hashed.append((it, sha))
    _prune(images_dir, {it.relpath for it in items})
    return hashed


def _same_file(src: Path, dest: Path) -> bool:
    if not dest.is_file():
        return False
    a, b = src.stat(), dest.stat()  # copy2 keeps the source's mtime on the copy
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _prune(images_dir: Path, keep: set[str]) -> None:
    """Remove snapshot files the source no longer has, then empty folders."""
    for p in sorted(images_dir.rglob("*"), reverse=True):
        rel = p.relative_to(images_dir).as_posix()
        if p.is_file() and rel not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
