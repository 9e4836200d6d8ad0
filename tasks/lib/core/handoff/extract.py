"""The files extract writes: the pointer to the current store and every candidate
backbone (<features>/current.json), the extract report and its DVC metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from tlflow.tasks.lib.core.errors import handoff_error
from tlflow.tasks.lib.core.files import write_json
from tlflow.tasks.lib.core.handoff.base import Handoff, Record

POINTER = "current.json"  # <features>/current.json: the store the current params select



class Candidate(Record):
    """One backbone extract computed codes with (extract.backbone, then extract.compare):
    what builds it again, its store, and what it costs. Train fits the same probe on each
    candidate's store and the best on val serves (tasks/lib/assess/compare.py)."""

    backbone: str  # <source>/<model>
    weights: str  # as extract.weights: packaged | imagenet | none | a file
    extractor_id: str  # its store is <features>/<extractor_id>.h5
    input_size: int  # pixels, as extract resolved extract.image_size for it
    dims: dict[str, int]  # code size D per layer
    gflops: float | None = None  # per image at input_size (torch's FlopCounterMode); compare
    parameters: int | None = None  # the backbone's, its ImageNet classifier included; compare

    def store(self, features_dir: Path) -> Path:
        return features_dir / f"{self.extractor_id}.h5"


class Pointer(Handoff):
    """<features>/current.json: the store the current params select (extract.backbone's) and
    every candidate of a comparison (that one first)."""

    STAGE: ClassVar[str] = "extract"
    extractor_id: str
    store: str  # the file's name in the features folder
    extractor: dict[str, Any]  # the extractor's description (featurestore's)
    candidates: tuple[Candidate, ...] = ()

    @classmethod
    def at(cls, features_dir: Path) -> Pointer:
        return cls.read(features_dir / POINTER)

    def write_to(self, features_dir: Path) -> None:
        self.write(features_dir / POINTER)


def current_store(features_dir: Path) -> Path:
    """The store the last extract run selected."""
    return features_dir / Pointer.at(features_dir).store


def read_candidates(features_dir: Path) -> tuple[Candidate, ...]:
    """The backbones the last extract run computed codes with, extract.backbone's first."""
    found = Pointer.at(features_dir).candidates
    if not found:
        raise handoff_error(features_dir / POINTER, "extract", "lists no candidate backbone")
    return found


def chosen_store(features_dir: Path, extractor_id: str, origin: Path) -> Path:
    """The store of the extractor a model was trained on (its sidecar says which, `origin`):
    with extract.compare that is the winner's, not always extract.backbone's."""
    path = features_dir / f"{extractor_id}.h5"
    if not path.is_file():
        raise handoff_error(origin, "train", f"names the codes of extractor {extractor_id}, "
                            f"which {features_dir} does not hold; rerun `tlflow run`")
    return path


def current_input_size(features_dir: Path) -> int:
    """The input size in pixels the current store's codes were computed at (extract resolves
    extract.image_size once; fine-tuning and predict use the same)."""
    try:
        return int(Pointer.at(features_dir).extractor["preprocess"]["input_size"][-1])
    except (KeyError, TypeError, IndexError, ValueError):
        raise handoff_error(features_dir / POINTER, "extract", "names no input size") from None


class BadImage(Record):
    """A manifest file extract could not read."""

    relpath: str
    sha256: str
    reason: str


class ExtractReport(Handoff):
    """How many image files the manifest holds and which could not be read: one entry per
    file (relpath), every copy of the same bytes listed. A function of (manifest, extractor)
    only: a rerun that computes nothing changes nothing."""

    STAGE: ClassVar[str] = "extract"
    extractor_id: str
    images: int
    bad_images: tuple[BadImage, ...]
    image_size: int | None = None  # the input size used, in pixels
    image_size_why: str = ""  # how extract.image_size resolved to it

    @property
    def bad(self) -> dict[str, str]:
        """sha256 -> why it could not be read."""
        return {b.sha256: b.reason for b in self.bad_images}

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "skipped": len(self.bad_images)}


def write_extract_metrics(path: Path, report: ExtractReport) -> None:
    """metrics/extract.json: `n`, the images in the manifest (how many were skipped as
    unreadable, and which, is the extract report's)."""
    write_json(path, {"n": report.images})
