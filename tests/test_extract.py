import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import COLOURS, make_params, write_image
from tlflow.tasks import extract, ingest
from tlflow.tasks.lib.core.device import resolve_device
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.extract import current_store
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.features.backbones import create_backbone
from tlflow.tasks.lib.features.extraction import encode
from tlflow.tasks.lib.features.store import FeatureStore, gc, info, writer_lock

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
    rows = read_manifest(ingested.base.paths.manifest)
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


def test_renamed_moved_and_deleted_images_cost_no_pass(ingested, image_folder: Path, capsys):
    path = extract.run(ingested)
    (image_folder / "red" / "00.png").rename(image_folder / "red" / "renamed.png")
    (image_folder / "blue" / "01.png").rename(image_folder / "red" / "moved.png")
    (image_folder / "green" / "02.png").unlink()
    ingest.run(ingested)
    capsys.readouterr()
    assert extract.run(ingested) == path
    assert "0 of 35 images to compute" in capsys.readouterr().out
    rows = read_manifest(ingested.base.paths.manifest)
    assert {r.relpath for r in rows} >= {"red/renamed.png", "red/moved.png"}
    with FeatureStore(path) as store:
        assert len(store.keys()) == 36  # the deleted image's row stays until `features gc`


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_codes_match_a_direct_forward_pass(ingested, precision: str):
    """The stored float16 codes are the backbone's codes of the preprocessed file, computed
    in the asked precision (bf16: within bf16's rounding of a direct bf16 pass)."""
    from PIL import Image

    from tlflow.tasks.lib.core.device import autocast
    from tlflow.tasks.lib.features.codes import CodeExtractor

    params = ingested.model_copy(update={"extract": ingested.extract.model_copy(
        update={"precision": precision})})
    path = extract.run(params)
    row = read_manifest(ingested.base.paths.manifest)[0]
    b = create_backbone("timm/tf_efficientnet_lite0", "packaged", image_size=32)
    x = b.transform()(Image.open(ingested.base.paths.images / row.relpath).convert("RGB"))
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        want = CodeExtractor(b, ("pooled",))(x[None])["pooled"].float().numpy()[0]
    with FeatureStore(path) as store:
        got = store.read("pooled", [row.sha256])[0].astype(np.float32)
    if precision == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    else:
        cosine = got @ want / np.linalg.norm(got) / np.linalg.norm(want)
        assert cosine > 0.995 and np.abs(got - want).max() < 0.1, cosine


def _bomb_png(path: Path) -> None:
    """A valid PNG header that declares 100,000 x 100,000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _add_bad_images(folder: Path) -> dict[str, str]:
    (folder / "red" / "empty.png").write_bytes(b"")
    (folder / "red" / "notes.jpg").write_text("not an image at all")
    good = folder / "green" / "00.png"
    from PIL import Image

    Image.open(good).convert("RGB").resize((200, 200)).save(folder / "green" / "cut.jpg")
    data = (folder / "green" / "cut.jpg").read_bytes()
    (folder / "green" / "cut.jpg").write_bytes(data[: len(data) // 2])
    _bomb_png(folder / "blue" / "bomb.png")
    return {"red/empty.png": "empty file", "red/notes.jpg": "not an image",
            "green/cut.jpg": "truncated", "blue/bomb.png": "decompression bomb"}


def test_bad_images_are_skipped_and_reported(ingested, image_folder: Path, capsys):
    from tlflow.tasks import evaluate, train

    expected = _add_bad_images(image_folder)
    ingest.run(ingested)
    capsys.readouterr()
    extract.run(ingested)
    out = capsys.readouterr().out
    report = json.loads(ingested.base.paths.extract_report.read_text())
    assert report["skipped"] == 4
    reasons = {b["relpath"]: b["reason"] for b in report["bad_images"]}
    assert set(reasons) == set(expected)
    for relpath, needle in expected.items():
        assert needle in reasons[relpath] and relpath in reasons[relpath]
        assert f"{relpath}: cannot read image" in out  # one line per file
    train.run(ingested)  # everything else proceeds
    evaluate.run(ingested)
    out = capsys.readouterr().out
    for relpath in expected:
        assert f"evaluate: skipped unreadable {relpath}" in out
    metrics = json.loads(ingested.base.paths.extract_metrics.read_text())
    assert metrics == {"n": report["images"]}  # the skipped are the report's


def test_bad_image_fails_the_run_when_asked(tmp_path: Path, image_folder: Path):
    (image_folder / "red" / "empty.png").write_bytes(b"")
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={**TINY, "on_bad_image": "fail"})
    ingest.run(params)
    with pytest.raises(TlflowError, match=r"red/empty\.png: cannot read image: empty file"):
        extract.run(params)


def test_a_second_writer_waits_then_fails_clearly(ingested):
    import threading
    import time

    path = extract.run(ingested)
    with writer_lock(path, 1.0):
        short = ingested.model_copy(update={"extract": ingested.extract.model_copy(
            update={"lock_timeout": 0.5})})
        with pytest.raises(TlflowError, match=r"another extract run holds .*\.h5\.lock"):
            extract.run(short)

    holding = threading.Event()

    def hold() -> None:
        with writer_lock(path, 1.0):
            holding.set()
            time.sleep(1.5)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait()
    t0 = time.monotonic()
    extract.run(ingested)  # waits for the holder, then proceeds
    assert time.monotonic() - t0 >= 1.0
    t.join()


def test_gc_prunes_unreferenced_rows_and_info_reports(ingested, image_folder: Path):
    path = extract.run(ingested)
    for p in sorted((image_folder / "red").iterdir())[:5]:
        p.unlink()
    ingest.run(ingested)
    paths = ingested.base.paths
    keep = {r.sha256 for r in read_manifest(paths.manifest)}
    assert gc(paths.features, keep, 10, dry_run=True) == [(path, 31, 5)]
    assert gc(paths.features, keep, 10) == [(path, 31, 0 + 5)]
    facts = info(path)
    assert facts["rows"] == 31 and facts["layers"] == {"blocks.2": 40, "pooled": 1280}
    assert facts["extractor"]["backbone"] == "timm/tf_efficientnet_lite0"
    rows = read_manifest(ingested.base.paths.manifest)
    with FeatureStore(path) as store:  # the kept codes are intact
        assert np.isfinite(store.read("pooled", [r.sha256 for r in rows])).all()
    assert gc(paths.features, keep, 10) == [(path, 31, 0)]


KILLER = """
import os, signal, sys
import numpy as np
from tlflow.flows.cli import main
from tlflow.tasks.lib.features.store import FeatureStore

calls = 0
real_append = FeatureStore.append

def append(self, keys, codes):
    global calls
    calls += 1
    if calls < {k}:
        return real_append(self, keys, codes)
    n = self.n_committed  # write the rows of batch k, flush, die before committing them
    self._h5["keys"].resize((n + len(keys),))
    self._h5["keys"][n:] = np.array(keys, dtype="S64")
    for name, ds in self._h5["layers"].items():
        ds.resize((n + len(keys), ds.shape[1]))
        ds[n:] = codes[name]
    self._h5.flush()
    os.kill(os.getpid(), signal.SIGKILL)

FeatureStore.append = append
sys.exit(main(["stage", "extract"]))
"""


@pytest.mark.faults  # make faults (CI), not make test
def test_sigkill_mid_batch_then_resume_gives_the_same_codes(tmp_path: Path, image_folder: Path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    def project(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["ingest"].update(source="folder", path=str(image_folder))
        raw["extract"].update(TINY, batch_size=4)
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        return root

    def run(root: Path, code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                              text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})

    stage = "import sys; from tlflow.flows.cli import main; sys.exit(main(['stage', '{s}']))"
    killed, whole = project("killed"), project("whole")
    for root in (killed, whole):
        assert run(root, stage.format(s="ingest")).returncode == 0
    proc = run(killed, KILLER.format(k=4))
    assert proc.returncode == -9, proc.stderr
    store = next((killed / "features").glob("*.h5"))
    with FeatureStore(store) as s:
        assert s.n_committed == 12  # three batches of 4 committed, the fourth torn
    proc = run(killed, stage.format(s="extract"))
    assert proc.returncode == 0 and "24 of 36 images to compute" in proc.stdout, proc.stderr
    assert run(whole, stage.format(s="extract")).returncode == 0
    keys = [r.sha256 for r in read_manifest(whole / "data/manifest.csv")]
    with FeatureStore(store) as a, FeatureStore(whole / "features" / store.name) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for layer in a.layers:
            np.testing.assert_array_equal(a.read(layer, keys), b.read(layer, keys))


def test_missing_manifest_and_unknown_device(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"manifest.csv: not found \(written by the ingest stage"):
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


@pytest.mark.gpu
def test_cuda_codes_match_cpu_codes():
    """bf16 autocast and channels_last on the GPU give the CPU's codes within bf16 error."""

    from tlflow.tasks.lib.features.codes import CodeExtractor

    b = create_backbone("timm/tf_efficientnet_lite0", "packaged", image_size=96)
    model = CodeExtractor(b, ("pooled", "blocks.4"))
    x = torch.randn(16, 3, 96, 96)
    cpu = encode(model, x, torch.device("cpu"), "fp32")
    gpu_model = model.to("cuda", memory_format=torch.channels_last)
    for precision, tol in (("fp32", 1e-3), ("bf16", 5e-2)):
        got = encode(gpu_model, x, torch.device("cuda"), precision)
        for k in cpu:
            rel = np.abs(got[k] - cpu[k]).max() / np.abs(cpu[k]).max()
            assert rel < tol, (precision, k, rel)


def test_a_damaged_store_is_never_used_as_a_cache(ingested):
    path = extract.run(ingested)
    with FeatureStore(path) as store:
        offset = store._h5["layers/pooled"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 64] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TlflowError, match=r"damaged \(layers/pooled fail their checksums\)"):
        extract.run(ingested)
    path.unlink()  # the repair the message names
    assert extract.run(ingested) == path


@pytest.mark.parametrize("damage", ["keys", "layers/blocks.2", "n_committed", "header"])
def test_a_store_with_damaged_structure_is_one_line_with_the_repair(ingested, damage: str):
    """Damage to the structure, not the codes (a dataset or attribute gone, the header
    overwritten): one line naming the store, what is missing and the repair, never a
    KeyError; the repair works."""
    import h5py

    path = extract.run(ingested)
    if damage == "header":
        with open(path, "r+b") as f:
            f.write(b"\0" * 8)  # HDF5's signature
        needle = "not a readable HDF5 feature store"
    else:
        with h5py.File(path, "a") as h5:
            if damage in h5.attrs:
                del h5.attrs[damage]
                needle = f"damaged structure \\(missing attribute {damage}\\)"
            else:
                del h5[damage]
                needle = "damaged structure \\(missing " + (
                    "dataset keys" if damage == "keys" else "") + ".*"
    with pytest.raises(TlflowError, match=needle) as err:
        extract.run(ingested)
    assert "delete it and run `tlflow stage extract`" in str(err.value)
    assert "\n" not in str(err.value)
    path.unlink()  # the repair the message names
    assert extract.run(ingested) == path
