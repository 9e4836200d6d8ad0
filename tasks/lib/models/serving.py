"""Which model serves and what it runs on: the version in prod (GTO) or the working tree's
probe or fine-tuned network, and, for a probe, the backbone and extractor settings its codes
come from. Shared by predict and export, so both always serve the same model the same way.

Nothing heavy is imported at module level: predict's start-up stays short.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import sha256_file
from tlflow.tasks.lib.core.params import Extract, Params
from tlflow.tasks.lib.models.registry import PROD, Version, fetch_model, promoted
from tlflow.tasks.lib.probe.head import LinearHead, load_head, meta_path, tensors_path

if TYPE_CHECKING:
    import torch

    from tlflow.tasks.lib.features.backbones import Backbone

MODELS = ("promoted", "probe", "finetuned")  # what --model names


@dataclass(frozen=True)
class Served:
    """The model asked for: `artifact` probe (a LinearHead) or finetuned (a Network), the
    registered version it is (None: the working tree's files), and the sha256 of the files it
    was loaded from ({path as base.paths names it: hex digest})."""

    artifact: str
    model: Any  # LinearHead | Network
    version: Version | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        """e.g. "probe v0.0.2 (1a2b3c4) in prod"; None for the working tree's model."""
        return f"{self.version.label()} in {PROD}" if self.version else None


def _hashes(stem: Path, named: Path) -> dict[str, str]:
    """sha256 of a model's tensors and sidecar at `stem`, keyed by their paths under `named`."""
    return {str(f(named)): sha256_file(f(stem)) for f in (tensors_path, meta_path)}


def _load(artifact: str, stem: Path) -> Any:
    if artifact == "finetuned":
        from tlflow.tasks.lib.finetune.network import load_network

        return load_network(stem)
    return load_head(stem)


def load_promoted(params: Params, root: Path = Path()) -> Served | None:
    """The model in prod, loaded from its files at its commit (a LinearHead or a Network);
    None when no version is assigned to prod (or there is no git repo)."""
    version = promoted(root, PROD)
    if version is None:
        return None
    named = getattr(params.base.paths, "finetuned" if version.artifact == "finetuned" else "head")
    with tempfile.TemporaryDirectory() as tmp:
        stem = fetch_model(root, params.base.paths, version, Path(tmp))
        return Served(version.artifact, _load(version.artifact, stem), version,
                      _hashes(stem, named))


def load_served(params: Params, model: str = "promoted", root: Path = Path()) -> Served | None:
    """The model `--model` names: `promoted` (the version in prod; None when none is), or the
    working tree's `probe` or `finetuned`. Raises TlflowError for another name, or when the
    model's files are missing or damaged (one line naming them and the stage that makes them)."""
    if model not in MODELS:
        raise TlflowError(f"--model: unknown model {model!r}; one of {list(MODELS)}")
    if model == "promoted":
        return load_promoted(params, root)
    stem = params.base.paths.finetuned if model == "finetuned" else params.base.paths.head
    loaded = _load(model, stem)  # checks the files first: one line when missing
    return Served(model, loaded, None, _hashes(stem, stem))


def served_backbone(head: LinearHead, params: Params,
                    device: torch.device) -> tuple[Backbone, Extract]:
    """The backbone the head's codes come from, at their input size (`head_backbone`), and
    extract's params as those codes were computed (precision, runtime, decoding, and the
    device to compute them on: `served_extractor`; `resolve_device(cfg.device)`).
    Raises TlflowError when params.yaml describes another extractor than the head's."""
    from tlflow.tasks.lib.core.device import resolve_device
    from tlflow.tasks.lib.features.extraction import describe_extractor
    from tlflow.tasks.lib.features.store import extractor_id

    backbone = head_backbone(head, params)
    cfg = served_extractor(params.extract, backbone.identity(), device,
                           head.meta.extractor_id)
    device = resolve_device(cfg.device)
    ext_id = extractor_id(describe_extractor(backbone.identity(), cfg, device))
    if ext_id != head.meta.extractor_id:
        raise TlflowError(
            f"params.yaml: extract describes extractor {ext_id} on {device}, the head was "
            f"trained on {head.meta.extractor_id}; run `tlflow run` first"
        )
    return backbone, cfg


def head_backbone(head: LinearHead, params: Params) -> Backbone:
    """The backbone a head's codes came from, at their input size: the one its sidecar names
    (train records extract.compare's winner), else, for a head from before that, params'
    extract.backbone at the size extract resolved for the current store."""
    from tlflow.tasks.lib.features.backbones import create_backbone

    cfg, meta = params.extract, head.meta
    if meta.backbone is not None:
        backbone = create_backbone(meta.backbone, meta.weights, None, params.base.seed)
        backbone.resize(int(meta.input_size))
        return backbone
    backbone = create_backbone(cfg.backbone, cfg.weights, None, params.base.seed)
    if cfg.image_size == "auto":  # as extract resolved it for the current store
        from tlflow.tasks.lib.core.handoff.extract import current_input_size

        backbone.resize(current_input_size(params.base.paths.features))
    elif cfg.image_size is not None:
        backbone.resize(cfg.image_size)
    return backbone


def served_extractor(cfg: Extract, identity: dict, device: torch.device,
                     served: str) -> Extract:
    """extract's params with the precision, runtime, decoding and device (`device`, else the
    CPU: a head on ONNX Runtime's codes is served on a GPU machine by its CPU) the served
    head's codes were computed with (its extractor id says which): a head trained on bf16
    codes (a CPU with AMX, say) computes bf16 codes here too, emulated where this CPU lacks
    it, and a head from before `extract.decode` decodes every pixel, rather than codes of
    another extractor.
    Unchanged when no combination gives the head's id."""
    import torch

    from tlflow.tasks.lib.features.extraction import describe_extractor
    from tlflow.tasks.lib.features.store import extractor_id

    trials = itertools.product(dict.fromkeys((device, torch.device("cpu"))),
                               dict.fromkeys((cfg.decode, "scaled", "full")),
                               dict.fromkeys((cfg.precision, "auto", "fp32", "bf16", "fp16")),
                               dict.fromkeys((cfg.runtime, "auto", "torch")))
    for on, decode, precision, runtime in trials:  # the asked ones first
        trial = cfg.model_copy(update={"precision": precision, "decode": decode,
                                       "runtime": runtime, "device": str(on)})
        with contextlib.suppress(TlflowError):  # a runtime that cannot run here
            if extractor_id(describe_extractor(identity, trial, on)) == served:
                return trial
    return cfg

