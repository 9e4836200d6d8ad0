"""Image sources: what ingest reads (the snapshot under data/images: data/snapshot.py).

Sources: `digits` (scikit-learn's bundled 8x8 digits written out as PNG files, the embedded
default), `folder` (root/<class>/<image>, or root/train|val|test/<class>/<image>) and `csv`
(path,label[,split], paths relative to the CSV). Splits not given by the source are drawn
from each image's content hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Ingest
from tlflow.tasks.lib.data.imagefiles import IMAGE_SUFFIXES, check_name, metadata_kind, walk_files
from tlflow.tasks.lib.data.manifest import SPLITS, Row


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
    proportions in expectation only (the draw is independent of the label): a class of a
    dozen images may get one test image or three. Not a stratified split.
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


@dataclass
class Ignored:
    """Files a source holds that are not data, counted by why (ingest reports them)."""

    metadata: Counter[str] = field(default_factory=Counter)  # kind (__MACOSX, ._*...) -> files
    not_images: Counter[str] = field(default_factory=Counter)  # suffix -> files
    outside: int = 0  # files not inside a class folder

    def add(self, relpath: str) -> bool:
        """Count relpath if it is metadata; whether it was."""
        kind = metadata_kind(relpath)
        if kind is not None:
            self.metadata[kind] += 1
        return kind is not None

    def summary(self) -> str:
        """One line, e.g. '51 metadata files (__MACOSX, ._*), 2 files that are not images
        (.txt)'; empty when nothing was ignored."""
        parts = []
        if self.metadata:
            parts.append(f"{_files(self.metadata.total(), 'metadata ')} "
                         f"({_kinds(self.metadata)})")
        if self.not_images:
            parts.append(f"{_files(self.not_images.total())} that are not images "
                         f"({_kinds(self.not_images)})")
        if self.outside:
            parts.append(f"{_files(self.outside)} outside the class folders")
        return ", ".join(parts)


def _files(n: int, what: str = "") -> str:
    return f"{n} {what}file{'' if n == 1 else 's'}"


def _kinds(counts: Counter[str], most: int = 4) -> str:
    names = sorted(counts, key=lambda k: (-counts[k], k))  # most first, then by name
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


@dataclass(frozen=True)
class Scan:
    """A source's images, and what it holds besides that was left out."""

    items: list[Item]
    ignored: Ignored


def _class_images(class_dir: Path, root: Path, split: str | None, ignored: Ignored,
                  follow: bool = False) -> list[Item]:
    """The images at any depth under a class folder; metadata and other files are counted.
    A symlink among them (file or folder) is refused unless `follow` (see `check_inside`)."""
    label, items = class_dir.name, []
    for rel in _walk(class_dir, root, follow):
        relpath = f"{class_dir.relative_to(root).as_posix()}/{rel}"
        if ignored.add(rel):
            continue
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            ignored.not_images[suffix or "no suffix"] += 1
            continue
        check_name(relpath, class_dir / rel)  # before anything is copied
        check_inside(class_dir / rel, root, relpath, follow)
        items.append(Item(relpath, label, split, src=class_dir / rel))
    if not items:
        raise TlflowError(f"ingest: class folder {class_dir} holds no images "
                          f"(expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def _scan_level(folder: Path, root: Path, split: str | None, ignored: Ignored,
                follow: bool = False) -> list[Item]:
    """The class folders directly under `folder` and their images; what else lies there
    (metadata folders and files, loose files) is counted, never a class."""
    items: list[Item] = []
    for entry in sorted(folder.iterdir()):
        rel = entry.relative_to(root).as_posix()
        if metadata_kind(entry.name) is not None:
            for sub in walk_files(entry) if entry.is_dir() else [""]:
                ignored.add(f"{rel}/{sub}" if sub else rel)
        elif entry.is_dir():
            items.extend(_class_images(entry, root, split, ignored, follow))
        else:
            ignored.outside += 1
    if not items:
        raise TlflowError(
            f"ingest: {folder} has no class folders (expected {folder}/<class>/<image>)"
        )
    return items


def _walk(folder: Path, root: Path, follow: bool) -> list[str]:
    """Every file under `folder` (posix, relative to it, sorted), symlinked files and broken
    links included. A symlinked folder is entered when `follow` (each real folder once: a link
    to an ancestor cannot loop), else refused (`check_inside`) unless it is metadata."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow):
        here = Path(dirpath)
        rel = here.relative_to(folder)
        seen.add(here.resolve())
        for name in list(dirnames):
            sub = here / name
            if not sub.is_symlink():
                continue
            if metadata_kind((rel / name).as_posix()) is not None or sub.resolve() in seen:
                dirnames.remove(name)
                continue
            check_inside(sub, root, sub.relative_to(root).as_posix(), follow)
        found.extend((rel / name).as_posix() for name in filenames)
    return sorted(found)


def check_inside(path: Path, root: Path, relpath: str, follow: bool, where: str = "ingest"
                 ) -> None:
    """Refuse, in one line naming the path and its target, a source path that goes through a
    symlink or resolves outside the source's root, unless the user allows it
    (`ingest.follow_symlinks: true`): a link must never bring a file from elsewhere on the
    machine into data/images and the DVC cache unasked. Hard links cannot be told apart from
    files and are copied as files."""
    target = path.resolve()
    if follow and not target.exists():
        raise TlflowError(f"{where}: {path} is a symlink to {target}, which does not exist")
    if follow or target == root.resolve() / relpath:
        return
    where_to = "inside" if root.resolve() in target.parents else "OUTSIDE"
    raise TlflowError(f"{where}: {path} is a symlink (or goes through one) to {target}, "
                      f"{where_to} the source {root}; nothing was copied: replace it with the "
                      "file, or set ingest.follow_symlinks: true to copy what it points to")


def scan_folder(root: Path, follow_symlinks: bool = False) -> Scan:
    """root/<class>/<image>, or root/train|val|test/<class>/<image> when already split.

    Images may lie at any depth under their class folder. OS and archive metadata (see
    `images.metadata_kind`: `__MACOSX`, `._*`, `.DS_Store`, `Thumbs.db`, hidden files and
    folders) is neither a class nor an image; it, files with other suffixes and files
    outside the class folders are counted in `Scan.ignored`. A symlink (to a file or a
    folder) is refused in one line naming it and its target, unless `follow_symlinks`
    (`check_inside`); `root` itself may be one.
    """
    if not root.is_dir():
        raise TlflowError(f"ingest.path: folder {root} does not exist")
    ignored = Ignored()
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in split_dirs:
        return Scan(_scan_level(root, root, None, ignored, follow_symlinks), ignored)
    # hymenoptera layout: train/ and val/ but no test/ -> val/ is the held-out test set
    names = {"train": "train", "val": "val", "test": "test"}
    if "test" not in split_dirs and "val" in split_dirs:
        names["val"] = "test"
    items = [it for s in split_dirs
             for it in _scan_level(root / s, root, names[s], ignored, follow_symlinks)]
    for entry in sorted(root.iterdir()):  # beside train/ val/ test/
        if entry.name in split_dirs:
            continue
        for sub in walk_files(entry) if entry.is_dir() else [""]:
            rel = entry.relative_to(root).as_posix() + (f"/{sub}" if sub else "")
            if not ignored.add(rel):
                ignored.outside += 1
    return Scan(items, ignored)


def folder_items(root: Path) -> list[Item]:
    """The images of a folder source (see `scan_folder`)."""
    return scan_folder(root).items


def scan_csv(csv_path: Path, follow_symlinks: bool = False) -> Scan:
    """Rows path,label[,split]; paths are relative to the CSV's folder.

    A row whose path is OS or archive metadata (a `__MACOSX/` or `._*` file a listing
    picked up) is left out and counted. Any other suffix is kept: the CSV says the file is
    an image, and extract reads it by its content. A row whose path goes through a symlink,
    or resolves outside the CSV's folder, is refused unless `follow_symlinks`.
    """
    if not csv_path.is_file():
        raise TlflowError(f"ingest.path: CSV file {csv_path} does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # Excel's BOM too
            reader = csv.DictReader(f)
            missing = {"path", "label"} - set(reader.fieldnames or ())
            if missing:
                raise TlflowError(f"{csv_path}: missing column(s) {sorted(missing)}; "
                                  "expected path,label[,split]")
            items = [_csv_item(csv_path, n, row, follow_symlinks)
                     for n, row in enumerate(reader, start=2)]
    except UnicodeDecodeError as err:
        raise TlflowError(f"{csv_path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save it as UTF-8") from None
    ignored = Ignored()
    return Scan([it for it in items if not ignored.add(it.relpath)], ignored)


def csv_items(csv_path: Path) -> list[Item]:
    """The images of a CSV source (see `scan_csv`)."""
    return scan_csv(csv_path).items


def _csv_item(csv_path: Path, line: int, row: dict[str, str], follow: bool = False) -> Item:
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
    check_inside(src, csv_path.parent, pure.as_posix(), follow, where)
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


def scan_source(cfg: Ingest) -> Scan:
    """The items of the configured source, and what it holds that is not data."""
    if cfg.source == "digits":
        return Scan(digits_items(), Ignored())
    if cfg.path is None:
        raise TlflowError(f"ingest.path: required when ingest.source is {cfg.source!r}")
    if cfg.source == "folder":
        return scan_folder(cfg.path, cfg.follow_symlinks)
    scan = scan_csv(cfg.path, cfg.follow_symlinks)
    check_csv_labels(scan.items, cfg.path)
    return scan
