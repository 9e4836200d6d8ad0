"""What changed between two runs: per class (accuracy then and now), per test image (newly
wrong, newly right) and in the data (images added and removed, by class).

Pure functions on what the hand-off files hold (handoff.PerClass, handoff.Predictions,
manifest.read_manifest): the I/O, reading the older run at a git revision through
DVC, is flows/committed.py's.

An image is the same image in both runs when its bytes (sha256) and its label are the same:
a renamed file is the same image, a relabelled one is removed from its old class and added to
its new one. The feature store is addressed the same way, so a probe's answer for an image
changes only when the model or the label did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tlflow.tasks.lib.core.handoff.evaluate import ClassScores, ImagePrediction
from tlflow.tasks.lib.data.manifest import Row

MAX_CHANGED = 48  # images shown per list (newly wrong, newly right) and model; counts complete


@dataclass(frozen=True)
class ClassDelta:
    """One model's accuracy on one class's test images (recall: the share of the class's
    images given its label) in the older run and now; None where a run had no such row."""

    model: str
    label: str
    then: float | None
    now: float | None
    support_then: int | None
    support_now: int | None

    @property
    def delta(self) -> float | None:
        """now - then; None unless both runs scored the class."""
        return None if self.then is None or self.now is None else self.now - self.then


@dataclass(frozen=True)
class ImageChange:
    """A test image both runs scored whose verdict changed: its answer then and now."""

    then: ImagePrediction
    now: ImagePrediction


@dataclass(frozen=True)
class ImageChanges:
    """One model's newly wrong and newly right test images, the most confident mistake
    first (newly wrong: by the loss now; newly right: by the loss then), and how many test
    images both runs scored."""

    model: str
    common: int
    newly_wrong: tuple[ImageChange, ...]
    newly_right: tuple[ImageChange, ...]


@dataclass(frozen=True)
class ClassData:
    """Images (sha256, label) added to and removed from one class, by split."""

    label: str
    added: dict[str, int]  # split -> images
    removed: dict[str, int]

    @property
    def n_added(self) -> int:
        return sum(self.added.values())

    @property
    def n_removed(self) -> int:
        return sum(self.removed.values())


def class_deltas(then: Sequence[ClassScores], now: Sequence[ClassScores]) -> list[ClassDelta]:
    """Per (model, class) the recall then and now, from two per-class tables
    (handoff.PerClass rows): now's rows in their order, then the classes only the older run
    had."""
    old = {(r.model, r.label): r for r in then}
    new = {(r.model, r.label): r for r in now}
    keys = [*new, *(k for k in old if k not in new)]
    return [ClassDelta(model, label,
                       old[model, label].recall if (model, label) in old else None,
                       new[model, label].recall if (model, label) in new else None,
                       old[model, label].support if (model, label) in old else None,
                       new[model, label].support if (model, label) in new else None)
            for model, label in keys]


def _by_image(preds: Iterable[ImagePrediction], model: str) -> dict[tuple[str, str],
                                                                     ImagePrediction]:
    """One model's predictions keyed by (sha256, label); copies of one file under one label
    get the same answer, so the last one stands for them all."""
    return {(p.sha256, p.label): p for p in preds if p.model == model}


def image_changes(then: list[ImagePrediction], now: list[ImagePrediction],
                  limit: int = MAX_CHANGED) -> tuple[ImageChanges, ...]:
    """Per model that both runs scored, the test images (same bytes, same label) right then
    and wrong now, and wrong then and right now: each list the `limit` most confident
    mistakes (the highest loss on the wrong side) first, in full up to `limit`."""
    out = []
    for model in dict.fromkeys(p.model for p in now):
        old, new = _by_image(then, model), _by_image(now, model)
        if not old:
            continue
        both = [ImageChange(old[k], new[k]) for k in new if k in old]
        wrong = sorted((c for c in both if c.then.correct and not c.now.correct),
                       key=lambda c: (-c.now.loss, c.now.relpath))
        right = sorted((c for c in both if not c.then.correct and c.now.correct),
                       key=lambda c: (-c.then.loss, c.now.relpath))
        out.append(ImageChanges(model, len(both), tuple(wrong), tuple(right)))
    return tuple(out)


def data_changes(then: list[Row], now: list[Row]) -> list[ClassData]:
    """Per class (sorted), the images added and removed, by split: counted as (sha256, label)
    pairs with their multiplicity, so a copy under a second name counts once more, a rename
    as neither, a relabel as removed from the old class and added to the new one, and an
    image moved to another split as neither. Only the classes with a change."""
    old, new = _splits(then), _splits(now)
    out = []
    for label in sorted({c for _, c in old} | {c for _, c in new}):
        added = _count(new, old, label)
        removed = _count(old, new, label)
        if added or removed:
            out.append(ClassData(label, added, removed))
    return out


def _splits(rows: list[Row]) -> dict[tuple[str, str], list[str]]:
    """(sha256, label) -> the split of each of its rows, in manifest order."""
    out: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        out.setdefault((r.sha256, r.label), []).append(r.split)
    return out


def _count(side: dict[tuple[str, str], list[str]], other: dict[tuple[str, str], list[str]],
           label: str) -> dict[str, int]:
    """The rows of `label` that `side` has beyond `other`'s, counted by their split."""
    out: Counter = Counter()
    for key, splits in side.items():
        if key[1] == label:
            out.update(splits[len(other.get(key, ())):])
    return dict(sorted(out.items()))
