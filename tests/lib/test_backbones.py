from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.features.backbones import POOLED, create_backbone, map_in_order
from tlflow.tasks.lib.features.codes import CodeExtractor

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


def _imagenet_top1_right(backbone, hymenoptera: Path) -> float:
    """Share of hymenoptera/val whose ImageNet top-1 is ant or bee, as labelled."""
    transform = backbone.transform()
    files = [(p, ANT) for p in sorted((hymenoptera / "val" / "ants").iterdir())]
    files += [(p, BEE) for p in sorted((hymenoptera / "val" / "bees").iterdir())]
    assert len(files) == 153
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in files])
    with torch.inference_mode():
        top1 = torch.cat([backbone.model(b).argmax(1) for b in x.split(64)]).numpy()
    return float(np.mean(top1 == np.array([c for _, c in files])))


@pytest.mark.accuracy
def test_packaged_weights_are_imagenet_weights(lite0, hymenoptera):
    """The ImageNet head names ants and bees: top-1 is right for >= 80% of hymenoptera/val
    (an accuracy claim on 153 photos at 224 px: `make accuracy`, as Lite1's and Lite2's)."""
    right = _imagenet_top1_right(lite0, hymenoptera)
    assert right >= 0.80, f"top-1 right on {right:.2%} of 153 images"


@pytest.mark.accuracy
@pytest.mark.parametrize("n", [1, 2])
def test_zoo_weights_are_imagenet_weights(n, hymenoptera):
    """Lite1 (240 px) and Lite2 (260 px), packaged: every tensor maps by position and shape
    (map_in_order), the ImageNet head is right on >= 80% of hymenoptera/val, and the codes
    the stages compute (CodeExtractor, encode) match timm's own
    forward (forward_features -> forward_head(pre_logits)) at cos >= 0.9999 in fp32 (bf16
    codes of Lite1/2 agree with them at a min cosine of 0.9988 here: README, the zoo)."""
    from tlflow.tasks.lib.features.extraction import encode

    b = create_backbone(f"timm/tf_efficientnet_lite{n}", "packaged")
    assert b.input_size == 224 + 16 * n + 4 * (n == 2)  # the model's own config: 240, 260
    right = _imagenet_top1_right(b, hymenoptera)
    assert right >= 0.80, f"lite{n}: top-1 right on {right:.2%} of 153 images"
    files = sorted((hymenoptera / "val" / "bees").iterdir())[:16]
    x = torch.stack([b.transform()(Image.open(p).convert("RGB")) for p in files])
    cpu = torch.device("cpu")
    codes = encode(CodeExtractor(b, (POOLED,)), x, cpu, "fp32")
    with torch.inference_mode():
        ref = b.model.forward_head(b.model.forward_features(x), pre_logits=True).numpy()
    got = codes[POOLED]
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999, f"lite{n}: min cosine {cos.min():.6f}"


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
        ("timm/resnet18", "packaged", "'packaged' weights exist only for timm/tf_efficientnet_"
                                      "lite0, timm/tf_efficientnet_lite1, timm/tf_efficientnet_"
                                      "lite2, not timm/resnet18"),
        ("torchvision/resnet18", "packaged", "not torchvision/resnet18"),
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
    resnet = create_backbone("torchvision/resnet18", "none")
    with pytest.raises(TlflowError, match=r"unknown layer 'layer9'.*'pooled', 'conv1'"):
        CodeExtractor(resnet, ("layer9",))
    with pytest.raises(TlflowError, match=r"layer 'fc' gives a \(1, 1000\) tensor"):
        CodeExtractor(resnet, ("fc",))(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- the codes, as hooks gave them


def _hooked_codes(backbone, layers, x):
    """The reference: codes captured by forward hooks (the classifier's input for pooled, a
    stage's output averaged over H, W), as tlflow computed them before forward_intermediates /
    create_feature_extractor. The hooks are removed before returning."""
    got, handles = {}, []

    def keep(name):
        def hook(_m, args, out=None):
            got[name] = args[0].flatten(1).float() if out is None else out.float().mean((2, 3))
        return hook

    try:
        for name in layers:
            if name == POOLED:
                handles.append(backbone.classifier.register_forward_pre_hook(keep(name)))
            else:
                m = backbone.model.get_submodule(name)
                handles.append(m.register_forward_hook(keep(name)))
        with torch.inference_mode():
            backbone.model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["timm/tf_efficientnet_lite0", "torchvision/resnet18"])
def test_codes_equal_the_hook_based_codes_and_leave_no_hook(name, lite0):
    """Every layer, on random input and (for lite0) on the packaged weights: bit for bit.
    torchvision/resnet18's bn1 is followed by an in-place ReLU: its code is bn1's output."""
    b = lite0 if name.startswith("timm/") else create_backbone(name, "none")
    layers = (POOLED, *[n for n in b.layer_names if n != "fc"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want = _hooked_codes(b, layers, x)
    for subset in (layers, layers[1:], (POOLED,)):  # with and without pooled (stop_early)
        model = CodeExtractor(b, subset)
        with torch.inference_mode():
            got = model(x)
        assert _no_hooks(b.model)
        assert list(got) == list(subset)
        for k in subset:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_one_forward_pass_for_all_layers_and_none_past_the_last_wanted(lite0):
    calls = []
    handles = [lite0.model.get_submodule(n).register_forward_hook(lambda *_, n=n: calls.append(n))
               for n in ("conv_stem", "blocks.3", "conv_head")]
    try:
        with torch.inference_mode():
            CodeExtractor(lite0, ("pooled", "blocks.4", "blocks.2"))(torch.zeros(2, 3, 32, 32))
            assert calls == ["conv_stem", "blocks.3", "conv_head"]
            calls.clear()
            CodeExtractor(lite0, ("blocks.0", "blocks.2"))(torch.zeros(2, 3, 32, 32))
            assert calls == ["conv_stem"]  # stop_early: blocks.3 on never run
    finally:
        for h in handles:
            h.remove()
