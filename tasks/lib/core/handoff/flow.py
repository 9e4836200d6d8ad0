"""The file `tlflow run` writes between extract and train: its new images, judged by
the probe that served before it."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

from tlflow.tasks.lib.core.handoff.base import Handoff, Record


class NewImage(Record):
    """A new image the previous probe finds novel."""

    relpath: str
    sha256: str
    label: str
    split: str
    distance: float  # to its k-th nearest training code, in the probe's novelty space


class NewImages(Handoff):
    """base.paths.new_images: the images a `tlflow run` brought (in its manifest, not in the
    previous run's), judged against the probe that served before the run retrained it
    (flows/drift.py): how many are novel, or why they could not be judged. Written by the
    flow after extract; read by the run summary, `tlflow run`'s output and the report. No
    file: the run brought nothing to judge (a first run, or no new image)."""

    STAGE: ClassVar[str] = "run"
    new: int  # new images with codes (extract's unreadable ones left out)
    novel: int | None  # None: not judged
    reason: str = ""  # why not judged ("" when judged)
    extractor_id: str | None = None  # the previous probe's codes
    layer: str | None = None
    k: int | None = None
    threshold: float | None = None
    images: tuple[NewImage, ...] = ()  # the novel ones, farthest first, at most max_listed
    max_listed: int = 0
    manifest_sha256: str | None = None  # the manifest whose new images these are

    @property
    def judged(self) -> bool:
        return self.novel is not None

    @classmethod
    def read(cls, path: Path) -> Self:
        """The file; a missing or malformed one is a TlflowError naming it and `tlflow run`."""
        from tlflow.tasks.lib.core.errors import TlflowError

        try:
            return super().read(path)
        except TlflowError as err:
            problem = str(err).removeprefix(f"{path}: ").split(" (written by")[0]
            raise TlflowError(f"{path}: {problem} (written by `tlflow run` after extract, "
                              "when a run brings new images)") from None
