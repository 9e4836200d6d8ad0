"""The files one stage writes and another reads, each with its one reader and writer.

| file (base.paths)            | written by | read by                               |
|------------------------------|------------|---------------------------------------|
| <features>/current.json      | extract    | train, finetune, evaluate, predict    |
| extract_report               | extract    | train, finetune, evaluate             |
| probe_metrics                | train      | advise, the run summary               |
| strategy                     | train      | advise, the run summary               |
| plan                         | train      | finetune (only the values it uses)    |
| eval_metrics                 | evaluate   | the run summary, history              |

(The manifest's owner is tasks/lib/manifest.py; the model files' are head.py and network.py.)
A missing or malformed file is a TlflowError naming the file and the stage that writes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.lib.errors import handoff_error
from tasks.lib.files import write_json

POINTER = "current.json"  # <features>/current.json: the store the current params select


def _read(path: Path, stage: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object with at least `keys`, or an error naming the file and its stage."""
    if not path.is_file():
        raise handoff_error(path, stage)
    return _parse(path.read_bytes(), path, stage, keys)


def _parse(text: str | bytes, path: Path, stage: str, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise handoff_error(path, stage, f"not valid JSON ({err})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise handoff_error(path, stage, f"expected a JSON object with keys {list(keys)}")
    return obj


# ---------------------------------------------------------------- extract


def write_pointer(features_dir: Path, store: Path, extractor: dict[str, Any]) -> None:
    """Point the stages downstream at the store the current params select."""
    write_json(features_dir / POINTER, {"extractor_id": store.stem, "store": store.name,
                                         "extractor": extractor})


def current_store(features_dir: Path) -> Path:
    """The store the last extract run selected."""
    obj = _read(features_dir / POINTER, "extract", ("store",))
    return features_dir / obj["store"]


def current_input_size(features_dir: Path) -> int:
    """The input size in pixels the current store's codes were computed at (extract resolves
    extract.image_size once; fine-tuning and predict use the same)."""
    obj = _read(features_dir / POINTER, "extract", ("extractor",))
    try:
        return int(obj["extractor"]["preprocess"]["input_size"][-1])
    except (KeyError, TypeError, IndexError, ValueError):
        raise handoff_error(features_dir / POINTER, "extract", "names no input size") from None


@dataclass(frozen=True)
class ExtractReport:
    """How many images the manifest holds and which could not be read (sha256 -> reason)."""

    extractor_id: str
    images: int
    bad_images: tuple[dict[str, str], ...]  # relpath, sha256, reason
    image_size: int | None = None  # the input size used, in pixels
    image_size_why: str = ""  # how extract.image_size resolved to it

    @property
    def bad(self) -> dict[str, str]:
        return {b["sha256"]: b["reason"] for b in self.bad_images}


def write_extract_report(path: Path, report: ExtractReport) -> None:
    """A function of (manifest, extractor) only: a rerun that computes nothing changes nothing."""
    write_json(path, {"extractor_id": report.extractor_id, "images": report.images,
                      "skipped": len(report.bad_images), "bad_images": list(report.bad_images),
                      "image_size": report.image_size, "image_size_why": report.image_size_why})


def read_extract_report(path: Path) -> ExtractReport:
    obj = _read(path, "extract", ("extractor_id", "images", "bad_images"))
    return ExtractReport(obj["extractor_id"], obj["images"], tuple(obj["bad_images"]),
                         obj.get("image_size"), obj.get("image_size_why", ""))


# ---------------------------------------------------------------- train


def write_probe_report(path: Path, best: dict[str, Any], layers: list[dict],
                       sweep: list[dict]) -> None:
    """metrics/probe.json: the chosen (layer, C), one row per layer, the whole sweep."""
    write_json(path, {"best": best, "layers": layers, "sweep": sweep})


def read_probe_report(path: Path) -> dict[str, Any]:
    return _read(path, "train", ("best", "layers", "sweep"))


def write_strategy(path: Path, decision: dict[str, Any]) -> None:
    write_json(path, decision)


def read_strategy(path: Path) -> dict[str, Any]:
    return _read(path, "train", ("size", "similarity", "plan", "evidence"))


@dataclass(frozen=True)
class TrainChoice:
    """The values of train's results that fine-tuning uses, and nothing else: a C_grid change
    that leaves them the same leaves this file's bytes, and so finetune, untouched."""

    pooled_C: float | None  # the C the sweep chose for pooled codes (the head's start)
    plan: str | None  # the plan fine-tuning carries out; None under advise.strategy: manual


def write_train_choice(path: Path, choice: TrainChoice) -> None:
    write_json(path, asdict(choice))


def read_train_choice(path: Path) -> TrainChoice:
    obj = _read(path, "train", ("pooled_C", "plan"))
    return TrainChoice(obj["pooled_C"], obj["plan"])


# ---------------------------------------------------------------- evaluate


def write_eval_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_json(path, metrics)


def read_eval_metrics(path: Path) -> dict[str, Any]:
    return _read(path, "evaluate", ("probe",))


def parse_eval_metrics(text: str, path: Path) -> dict[str, Any]:
    """The eval metrics from their JSON text (e.g. as committed at a git revision)."""
    return _parse(text, path, "evaluate", ("probe",))
