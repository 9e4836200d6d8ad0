"""The file finetune writes for others: the learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from tlflow.tasks.lib.core.files import write_text
from tlflow.tasks.lib.core.handoff.base import CsvHandoff, Record, csv_text


class CurvePoint(Record):
    """One fine-tuning epoch (tasks/lib/finetune/loop.py, rounded to 6 decimals there)."""

    epoch: int  # numbered along the whole curve (a second phase continues the first's)
    train_loss: float  # mean cross-entropy over the epoch's batches, nats per image
    val_accuracy: float  # after the epoch, in [0, 1]


CURVE_COLUMNS = ("epoch", "train_loss", "val_accuracy")


class FinetuneCurve(CsvHandoff):
    """plots/finetune.csv (a DVC plot): one row per epoch run, in order; only the header when
    fine-tuning is off."""

    STAGE: ClassVar[str] = "finetune"
    WHAT: ClassVar[str] = "a fine-tuning curve"
    points: tuple[CurvePoint, ...]

    @classmethod
    def from_rows(cls, table: list[dict[str, str]]) -> FinetuneCurve:
        return cls(points=tuple(CurvePoint(
            epoch=int(r["epoch"]), train_loss=float(r["train_loss"]),
            val_accuracy=float(r["val_accuracy"])) for r in table))

    def write(self, path: Path) -> None:
        write_text(path, csv_text(CURVE_COLUMNS, ((p.epoch, p.train_loss, p.val_accuracy)
                                                  for p in self.points)))
