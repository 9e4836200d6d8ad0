from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.lib.backbones import CodeExtractor, create_backbone, map_in_order
from tasks.lib.errors import TlflowError
from tests.conftest import HYMENOPTERA

ANT, BEE = 310, 309  # ImageNet class indices


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("timm/tf_efficientnet_lite0", "packaged")


def test_packaged_weights_map_every_tensor(lite0):
    assert lite0.weights_id.startswith("sha256:")
    assert lite0.data_config["mean"] == (0.5, 0.5, 0.5)  # from the model's own config
    assert lite0.data_config["input_size"] == (3, 224, 224)


def test_map_in_order_refuses_a_shape_mismatch():
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(TlflowError, match=r"tensor b \(4,\) does not fit y \(5,\)"):
        map_in_order(src, {"x": torch.zeros(2, 3), "y": torch.zeros(5)})
    with pytest.raises(TlflowError, match="1 tensors in the file, 2 in the model"):
        map_in_order({"a": torch.zeros(1)}, src)


@pytest.mark.slow
def test_packaged_weights_are_imagenet_weights(lite0):
    """The ImageNet head names ants and bees: top-1 is right for >= 80% of hymenoptera/val."""
    transform = lite0.transform()
    files = [(p, ANT) for p in sorted((HYMENOPTERA / "val" / "ants").iterdir())]
    files += [(p, BEE) for p in sorted((HYMENOPTERA / "val" / "bees").iterdir())]
    assert len(files) == 153
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in files])
    with torch.inference_mode():
        top1 = torch.cat([lite0.model(b).argmax(1) for b in x.split(64)]).numpy()
    right = np.mean(top1 == np.array([c for _, c in files]))
    assert right >= 0.80, f"top-1 right on {right:.2%} of 153 images"


def test_codes_have_the_declared_shape_and_no_nan(lite0):
    model = CodeExtractor(lite0, ("pooled", "blocks.4", "blocks.2"))
    codes = model(torch.randn(3, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in codes.items()} == {
        "pooled": (3, 1280), "blocks.4": (3, 112), "blocks.2": (3, 40)}
    assert all(torch.isfinite(v).all() for v in codes.values())
    assert model.dims(64) == {"pooled": 1280, "blocks.4": 112, "blocks.2": 40}


def test_any_input_size_gives_the_same_code_size(lite0):
    model = CodeExtractor(lite0, ("pooled",))
    for size in (32, 96, 160):
        assert model(torch.randn(1, 3, size, size))["pooled"].shape == (1, 1280)


def test_image_size_overrides_only_the_input_size():
    b = create_backbone("timm/tf_efficientnet_lite0", "none", image_size=64)
    assert b.data_config["input_size"] == (3, 64, 64)
    assert b.data_config["interpolation"] == "bicubic"  # the rest from the model's config


def test_torchvision_backbone_without_weights():
    b = create_backbone("torchvision/resnet18", "none")
    assert b.data_config["input_size"] == (3, 224, 224)
    codes = CodeExtractor(b, ("pooled", "layer3"))(torch.randn(2, 3, 64, 64))
    assert codes["pooled"].shape == (2, 512) and codes["layer3"].shape == (2, 256)


def test_local_safetensors_weights_round_trip(tmp_path: Path, lite0):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    b = create_backbone("timm/tf_efficientnet_lite0", str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(b.model(x), lite0.model(x))


@pytest.mark.parametrize(
    ("name", "weights", "needle"),
    [
        ("resnet18", "none", "not <source>/<model>; sources: ['timm', 'torchvision']"),
        ("timm/no_such_net", "none", "timm has no model 'no_such_net'"),
        ("torchvision/no_such_net", "none", "torchvision has no model"),
        ("timm/resnet18", "packaged", "'packaged' weights exist only for"),
        ("timm/tf_efficientnet_lite0", "/nowhere/w.pth", "/nowhere/w.pth does not exist"),
    ],
)
def test_bad_backbone_params(name, weights, needle):
    with pytest.raises(TlflowError) as err:
        create_backbone(name, weights)
    assert needle in str(err.value)


def test_pickled_weights_file_is_refused(tmp_path: Path):
    import pickle

    path = tmp_path / "w.pth"
    path.write_bytes(pickle.dumps({"conv_stem.weight": object()}))
    with pytest.raises(TlflowError, match="cannot read"):
        create_backbone("timm/tf_efficientnet_lite0", str(path))


def test_imagenet_weights_fail_clearly_offline():
    with pytest.raises(TlflowError, match="could not be downloaded"):
        create_backbone("timm/tf_efficientnet_lite0", "imagenet")


def test_unknown_layer_lists_the_valid_ones(lite0):
    with pytest.raises(TlflowError, match=r"unknown layer 'blocks.9'.*'pooled', 'blocks.0'"):
        CodeExtractor(lite0, ("blocks.9",))
