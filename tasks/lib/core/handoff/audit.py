"""The files audit writes: near-duplicates and label conflicts, likely label errors,
the class balance, and its DVC metric."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from tlflow.tasks.lib.core.files import write_json
from tlflow.tasks.lib.core.handoff.base import Handoff, Record


class AuditImage(Record):
    """An image the audit names."""

    relpath: str
    sha256: str
    label: str
    split: str


class NearDuplicatePair(Record):
    similarity: float  # cosine of the centred codes
    exact: bool  # the same bytes
    image: AuditImage  # in val or test
    train_image: AuditImage


class NearDuplicates(Record):
    threshold: float  # the similarity from which a pair is listed
    train_typical: float | None = None  # the train split's typical nearest similarity
    count: int  # pairs across splits (all of them; `pairs` lists the first max_listed)
    pairs: tuple[NearDuplicatePair, ...]


class FileGroup(Record):
    """Files with the same bytes (one sha256)."""

    sha256: str
    labels: tuple[str, ...]
    splits: tuple[str, ...] = ()
    crosses_splits: bool = False
    images: tuple[AuditImage, ...]


class FileGroups(Record):
    count: int  # groups
    files: int | None = None  # files in them
    groups: tuple[FileGroup, ...]  # the first max_listed


class Duplicates(Handoff):
    """reports/duplicates.json: near-duplicates across splits, one file under two labels,
    the same bytes under several names (tasks/lib/assess/audit.py)."""

    STAGE: ClassVar[str] = "audit"
    threshold: float
    layer: str | None = None  # the codes compared
    near_duplicates: NearDuplicates
    label_conflicts: FileGroups
    identical_files: FileGroups | None = None


class LabelIssue(AuditImage):
    suggested: str  # the label the out-of-fold probes suggest
    p_label: float  # their probability of the given label ...
    p_suggested: float  # ... and of the suggested one


class LabelIssues(Handoff):
    """reports/label_issues.json: likely label errors (confident learning), the least
    self-confident first (tasks/lib/audit.label_issues)."""

    STAGE: ClassVar[str] = "audit"
    method: str
    layer: str | None = None
    C: tuple[float, ...] = ()
    checked: int | None = None  # train + val images checked
    folds: int = 0
    oof_accuracy: float | None = None  # how often the out-of-fold probes agree with labels
    count: int
    images: tuple[LabelIssue, ...]  # the first max_listed
    skipped: str | None = None  # why nothing was checked


class Balance(Handoff):
    """reports/balance.json: images per class and split, per split the largest class over
    the smallest (None when a class is missing there) and the classes it lacks."""

    STAGE: ClassVar[str] = "audit"
    classes: tuple[str, ...]
    splits: dict[str, dict[str, int]]
    imbalance: dict[str, float | None] = Field(default_factory=dict)
    missing: dict[str, list[str]] = Field(default_factory=dict)


def write_audit_metrics(path: Path, counts: dict[str, int]) -> None:
    """metrics/audit.json: near-duplicate pairs across splits (`dups`) and likely label errors
    (`label_issues`); the other counts are the audit reports' (duplicates, label_issues)."""
    write_json(path, {"dups": counts["near_duplicates"], "label_issues": counts["label_issues"]})
