"""A linear head on disk: safetensors (weight, bias, feature mean and scale) plus a JSON sidecar.

No pickle: loading reads tensors and JSON only, and never executes code from the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlflow.tasks.lib.core.errors import TlflowError, handoff_error
from tlflow.tasks.lib.core.files import atomic_path, sha256_file, write_json

FORMAT = "tlflow.linear_head/1"
_TENSORS = ("weight", "bias", "mean", "scale")
REFERENCE = "reference"  # optional: training codes for the novelty check (tasks/lib/probe/trust.py)


@dataclass(frozen=True)
class LinearHead:
    """softmax(((x - mean) / scale) @ weight.T + bias) over `classes`."""

    weight: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    classes: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # layer, extractor_id, C, val_accuracy...
    # (R, D) raw training codes (float16) the novelty check measures against; None: no check
    reference: np.ndarray | None = None

    def features(self, codes: np.ndarray) -> np.ndarray:
        """The codes (N, D) in the space the linear layer reads: l2-normalized when the head
        says so, then (codes - mean) / scale; (N, D)."""
        if self.meta.get("normalize") == "l2":
            codes = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
        return (codes - self.mean) / self.scale

    def logits(self, codes: np.ndarray) -> np.ndarray:
        """Class scores for a batch of codes (N, D) -> (N, K)."""
        return self.features(codes) @ self.weight.T + self.bias

    @property
    def has_probabilities(self) -> bool:
        """False for a linear SVM: its scores are decision values, not probabilities."""
        return self.meta.get("scores", "probability") != "decision"

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        """Softmax of the logits; for a one-vs-rest head (sgd, log loss) the normalized
        sigmoids, as scikit-learn computes them."""
        from scipy.special import expit

        z = self.logits(codes)
        if self.meta.get("scores") == "ovr_probability":
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


TENSORS_SHA256 = "tensors_sha256"  # the sidecar's record of the tensors it goes with


def write_pair(stem: Path, write_tensors: Callable[[Path], None], meta: dict[str, Any]) -> None:
    """A model's two files: the tensors (written by `write_tensors` to a temp path), then the
    sidecar, which records their sha256. Each lands by an atomic rename; a crash between the
    two leaves tensors that no sidecar vouches for, which `check_pair` refuses."""
    with atomic_path(tensors_path(stem)) as tmp:
        write_tensors(tmp)
    write_json(meta_path(stem), {**meta, TENSORS_SHA256: sha256_file(tensors_path(stem))})


def check_pair(stem: Path, meta: dict[str, Any], stage: str) -> None:
    """The tensors are the ones the sidecar was written with; otherwise one line saying to
    rerun the stage that makes them (a run was killed between the two files)."""
    if meta.get(TENSORS_SHA256) != sha256_file(tensors_path(stem)):
        raise TlflowError(f"{tensors_path(stem)} does not match its sidecar {meta_path(stem)} "
                          f"(a run stopped between writing them): rerun `tlflow stage {stage}`")


def save_head(head: LinearHead, stem: Path) -> None:
    """The head's tensors and sidecar (tasks/lib/probe/head.py `write_pair`)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(getattr(head, k), dtype=np.float32) for k in _TENSORS}
    if head.reference is not None:
        tensors[REFERENCE] = np.ascontiguousarray(head.reference, dtype=np.float16)
    write_pair(stem, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}),
               {**head.meta, "format": FORMAT, "classes": list(head.classes)})


def parse_meta(text: str, where: str) -> dict[str, Any]:
    """A head's sidecar from its JSON text (read from disk, or from git / DVC at a revision);
    `where` names it in the error."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise handoff_error(Path(where), "train", f"not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise handoff_error(Path(where), "train", f"not a {FORMAT} sidecar")
    return meta


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
    meta = parse_meta(sidecar.read_text(errors="replace"), str(sidecar))
    check_pair(stem, meta, "train")
    if set(tensors) - {REFERENCE} != set(_TENSORS):
        raise TlflowError(f"{path}: not a {FORMAT} head (tensors {sorted(tensors)})")
    if extractor_id is not None and meta.get("extractor_id") != extractor_id:
        raise TlflowError(
            f"{path}: trained on codes of extractor {meta.get('extractor_id')}, "
            f"not {extractor_id}; rerun `tlflow stage train`"
        )
    classes = tuple(meta.pop("classes"))
    meta.pop("format")
    meta.pop(TENSORS_SHA256)
    return LinearHead(**{k: tensors[k] for k in _TENSORS}, classes=classes, meta=meta,
                      reference=tensors.get(REFERENCE))
