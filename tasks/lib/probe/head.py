"""A linear head on disk: safetensors (weight, bias, feature mean and scale) plus a JSON sidecar.

No pickle: loading reads tensors and JSON only, and never executes code from the file.

The sidecar is a hand-off file (train writes it; evaluate, predict, export, finetune, the
history and the drift check read it): one pydantic model, `HeadSidecar`, whose fields are its
keys. `HeadMeta` (the head's record, without its classes and the tensors' hash) is what a
`LinearHead` carries; `Calibration` is shared with the fine-tuned network's sidecar
(tasks/lib/finetune/network.py). A sidecar holds the keys it was given: one written by an
older tlflow, without the keys added since, reads (their defaults say what it meant) and is
written back with the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np

from tlflow.tasks.lib.core.errors import TlflowError, handoff_error
from tlflow.tasks.lib.core.files import atomic_path, sha256_file
from tlflow.tasks.lib.core.handoff.base import Handoff, Record

FORMAT = "tlflow.linear_head/1"
_TENSORS = ("weight", "bias", "mean", "scale")
REFERENCE = "reference"  # optional: training codes for the novelty check (tasks/lib/probe/trust.py)
TENSORS_SHA256 = "tensors_sha256"  # the sidecar's record of the tensors it goes with


# ---------------------------------------------------------------- the sidecar


class Calibration(Record):
    """Temperature scaling fitted for a model (tasks/lib/probe/trust.py; Guo et al. 2017):
    softmax(logits / temperature) is its calibrated confidence."""

    method: str = "temperature"
    temperature: float  # T > 0, dimensionless: divides the logits
    fit_on: str  # what it was fitted on: "out-of-fold logits, train + val" | "val logits"
    nll: float  # mean negative log-likelihood (nats per image) on those logits, before ...
    nll_calibrated: float  # ... and after dividing by T
    folds: int | None = None  # the probe's out-of-fold k (the network's: None, val logits)


class Novelty(Record):
    """The probe's novelty check (tasks/lib/probe/novelty.py): an image is novel when its
    k-th nearest reference code lies farther than `threshold`."""

    k: int  # the neighbour whose distance counts
    threshold: float  # Euclidean distance between L2-normalized standardized codes, in [0, 2]
    rate: float  # the share of held-out codes beyond it, in [0, 1]
    threshold_on: str  # "val" | "train, leave one out"
    reference_rows: int  # training codes kept as the reference (the `reference` tensor)
    train_rows: int  # train images the reference was drawn from


class ModelMeta(Handoff):
    """What a model's sidecar says that predict and evaluate read of any model: its
    calibration (None: not calibrated, or a sidecar from before tlflow calibrated)."""

    STAGE: ClassVar[str] = "train"
    FORMAT: ClassVar[str | None] = None  # a sidecar file's `format`, checked before the rest
    calibration: Calibration | None = None

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> Self:
        """The sidecar from its JSON text; another file (another format) is named as such."""
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None  # Handoff.parse says what is wrong with it
        if cls.FORMAT is not None and obj is not None and (
                not isinstance(obj, dict) or obj.get("format") != cls.FORMAT):
            raise handoff_error(path, cls.STAGE, f"not a {cls.FORMAT} sidecar")
        return super().parse(text, path)

    def as_json(self) -> dict[str, Any]:
        """The keys it was given (an older sidecar's bytes stay the same)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def with_(self, **changes: Any) -> Any:
        """A copy with these keys set (validated; they are written)."""
        return type(self).model_validate({**self.as_json(), **changes})


class HeadMeta(ModelMeta):
    """A linear head's record: what it reads (layer, extractor), how train chose and fitted
    it, and its trust record. A head fitted outside train (a comparison's, a fold's, the
    fine-tuned network's start) has only what it was given."""

    layer: str  # the codes it reads: a layer of extract.layers (pooled, blocks.N)
    extractor_id: str  # ... of the store <features>/<extractor_id>.h5
    classifier: str | None = None  # train.classifier: logistic | svm | sgd
    C: float | None = None  # inverse regularization strength (scikit-learn's C)
    val_accuracy: float | None = None  # on val (or CV), in [0, 1]
    val_set: str | None = None  # the val images' identity (probes.val_set_id)
    backbone: str | None = None  # <source>/<model> (None: a head from before compare)
    weights: str | None = None  # as extract.weights
    input_size: int | None = None  # pixels, the codes' input size
    normalize: str = "standardize"  # the codes' scaling before mean/scale: standardize | l2 | none
    scores: str = "probability"  # probability (softmax) | ovr_probability | decision (SVM)
    novelty: Novelty | None = None  # None: no novelty check (sgd keeps one; old heads none)


class HeadSidecar(HeadMeta):
    """<head>.json: the head's record, its classes in the weight's row order, the format and
    the sha256 of the tensors it goes with (None in a sidecar from before it was recorded,
    which `check_pair` refuses)."""

    FORMAT: ClassVar[str | None] = FORMAT
    format: Literal["tlflow.linear_head/1"]
    classes: tuple[str, ...]
    tensors_sha256: str | None = None

    def meta(self) -> HeadMeta:
        """The head's record (without classes, format and hash)."""
        return HeadMeta.model_validate(self.model_dump(
            exclude_unset=True, exclude={"format", "classes", TENSORS_SHA256}))


@dataclass(frozen=True)
class LinearHead:
    """softmax(((x - mean) / scale) @ weight.T + bias) over `classes`."""

    weight: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    classes: tuple[str, ...]
    meta: HeadMeta  # layer, extractor_id, C, val_accuracy, calibration, novelty...
    # (R, D) raw training codes (float16) the novelty check measures against; None: no check
    reference: np.ndarray | None = None

    def features(self, codes: np.ndarray) -> np.ndarray:
        """The codes (N, D) in the space the linear layer reads: l2-normalized when the head
        says so, then (codes - mean) / scale; (N, D)."""
        if self.meta.normalize == "l2":
            codes = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
        return (codes - self.mean) / self.scale

    def logits(self, codes: np.ndarray) -> np.ndarray:
        """Class scores for a batch of codes (N, D) -> (N, K)."""
        return self.features(codes) @ self.weight.T + self.bias

    @property
    def has_probabilities(self) -> bool:
        """False for a linear SVM: its scores are decision values, not probabilities."""
        return self.meta.scores != "decision"

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        """Softmax of the logits; for a one-vs-rest head (sgd, log loss) the normalized
        sigmoids, as scikit-learn computes them."""
        z = self.logits(codes)
        if self.meta.scores == "ovr_probability":
            from scipy.special import expit  # here: softmax heads never import scipy

            p = expit(z)
            return p / p.sum(axis=1, keepdims=True)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes)[self.logits(codes).argmax(axis=1)]


def tensors_path(stem: Path) -> Path:
    """The head's tensors: <stem>.safetensors."""
    return Path(f"{stem}.safetensors")


def meta_path(stem: Path) -> Path:
    """The head's JSON sidecar: <stem>.json."""
    return Path(f"{stem}.json")


def write_pair(stem: Path, write_tensors: Callable[[Path], None], sidecar: ModelMeta) -> None:
    """A model's two files: the tensors (written by `write_tensors` to a temp path), then the
    sidecar with their sha256. Each lands by an atomic rename; a crash between the two leaves
    tensors that no sidecar vouches for, which `check_pair` refuses."""
    with atomic_path(tensors_path(stem)) as tmp:
        write_tensors(tmp)
    sidecar.with_(**{TENSORS_SHA256: sha256_file(tensors_path(stem))}).write(meta_path(stem))


def check_pair(stem: Path, sidecar: HeadSidecar | ModelMeta, stage: str) -> None:
    """The tensors are the ones the sidecar was written with; otherwise one line saying to
    rerun the stage that makes them (a run was killed between the two files)."""
    if getattr(sidecar, TENSORS_SHA256, None) != sha256_file(tensors_path(stem)):
        raise TlflowError(f"{tensors_path(stem)} does not match its sidecar {meta_path(stem)} "
                          f"(a run stopped between writing them): rerun `tlflow stage {stage}`")


def save_head(head: LinearHead, stem: Path) -> None:
    """The head's tensors and sidecar (tasks/lib/probe/head.py `write_pair`)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(getattr(head, k), dtype=np.float32) for k in _TENSORS}
    if head.reference is not None:
        tensors[REFERENCE] = np.ascontiguousarray(head.reference, dtype=np.float16)
    write_pair(stem, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}),
               HeadSidecar.model_validate({**head.meta.as_json(), "format": FORMAT,
                                           "classes": head.classes}))


def parse_meta(text: str | bytes, where: str) -> HeadSidecar:
    """A head's sidecar from its JSON text (read from disk, or from git / DVC at a revision);
    `where` names it in the error (TlflowError: one line naming it and the train stage)."""
    return HeadSidecar.parse(text, Path(where))


def load_head(stem: Path, extractor_id: str | None = None) -> LinearHead:
    """Read a head; refuse a pickle, a truncated file or one from another extractor."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path, sidecar = tensors_path(stem), meta_path(stem)
    if not path.is_file() or not sidecar.is_file():
        raise TlflowError(f"{path} or its sidecar {sidecar.name}: not found "
                          "(run `tlflow stage train`)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TlflowError(f"{path}: not a safetensors head (pickles are refused): {err}") from None
    meta = HeadSidecar.read(sidecar)
    check_pair(stem, meta, "train")
    if set(tensors) - {REFERENCE} != set(_TENSORS):
        raise TlflowError(f"{path}: not a {FORMAT} head (tensors {sorted(tensors)})")
    if extractor_id is not None and meta.extractor_id != extractor_id:
        raise TlflowError(
            f"{path}: trained on codes of extractor {meta.extractor_id}, "
            f"not {extractor_id}; rerun `tlflow stage train`"
        )
    return LinearHead(**{k: tensors[k] for k in _TENSORS}, classes=meta.classes,
                      meta=meta.meta(), reference=tensors.get(REFERENCE))
