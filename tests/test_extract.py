from pathlib import Path

import numpy as np
import pytest

from tasks import extract, ingest
from tasks.backbones import create_backbone
from tasks.errors import TlflowError
from tasks.extract import current_store, describe_extractor, resolve_device
from tasks.featurestore import FeatureStore, extractor_id
from tests.conftest import COLOURS, make_params, write_image

TINY = {"weights": "packaged", "layers": ["pooled", "blocks.2"], "image_size": 32,
        "batch_size": 8}


@pytest.fixture
def ingested(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract=TINY)
    ingest.run(params)
    return params


def test_extract_fills_the_store_once(ingested, capsys):
    path = extract.run(ingested)
    assert current_store(ingested.base.paths.features) == path
    rows = ingest.read_manifest(ingested.base.paths.manifest)
    with FeatureStore(path) as store:
        assert sorted(store.keys()) == sorted(r.sha256 for r in rows)
        assert store.layers == {"pooled": 1280, "blocks.2": 40}
        codes = store.read("pooled", [r.sha256 for r in rows])
    assert codes.shape == (36, 1280) and np.isfinite(codes).all()
    capsys.readouterr()
    extract.run(ingested)
    assert "0 of 36 images to compute" in capsys.readouterr().out


def test_new_images_cost_only_their_passes(ingested, image_folder: Path, capsys):
    extract.run(ingested)
    for i in range(3):
        write_image(image_folder / "green" / f"new{i}.png", COLOURS["green"], seed=500 + i)
    ingest.run(ingested)
    capsys.readouterr()
    path = extract.run(ingested)
    assert "3 of 39 images to compute" in capsys.readouterr().out
    with FeatureStore(path) as store:
        assert len(store.keys()) == 39


def test_codes_match_a_direct_forward_pass(ingested):
    """The stored float16 codes are the backbone's codes of the preprocessed file."""
    import torch
    from PIL import Image

    from tasks.backbones import CodeExtractor

    path = extract.run(ingested)
    row = ingest.read_manifest(ingested.base.paths.manifest)[0]
    b = create_backbone("timm/tf_efficientnet_lite0", "packaged", image_size=32)
    x = b.transform()(Image.open(ingested.base.paths.images / row.relpath).convert("RGB"))
    with torch.inference_mode():
        want = CodeExtractor(b, ("pooled",))(x[None])["pooled"].numpy()[0]
    with FeatureStore(path) as store:
        got = store.read("pooled", [row.sha256])[0]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_extractor_id_covers_what_changes_a_code(tmp_path: Path):
    def ext_id(**over):
        cfg = make_params(tmp_path, extract={**TINY, **over}).extract
        b = create_backbone(cfg.backbone, cfg.weights, cfg.image_size)
        return extractor_id(describe_extractor(b.identity(), cfg))

    base = ext_id()
    assert ext_id(batch_size=1) == base and ext_id(device="cpu") == base
    assert ext_id(image_size=48) != base
    assert ext_id(dtype="float32") != base
    assert ext_id(layers=["pooled"]) != base
    assert ext_id(weights="none") != base


def test_bad_image_names_the_file(ingested, image_folder: Path):
    (image_folder / "red" / "broken.png").write_bytes(b"")
    ingest.run(ingested)
    with pytest.raises(TlflowError, match=r"red/broken.png: cannot read image"):
        extract.run(ingested)


def test_missing_manifest_and_unknown_device(tmp_path: Path):
    with pytest.raises(TlflowError, match="manifest not found"):
        extract.run(make_params(tmp_path, extract=TINY))
    assert resolve_device("cpu").type == "cpu"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        with pytest.raises(TlflowError, match="no CUDA GPU"):
            resolve_device("cuda")
