"""extract.runtime: ONNX Runtime's codes against torch's, the graph kept once, and the
configurations that cannot run refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Extract
from tlflow.tasks.lib.features import runtime
from tlflow.tasks.lib.features.backbones import create_backbone
from tlflow.tasks.lib.features.codes import CodeExtractor
from tlflow.tasks.lib.features.extraction import encode, encode_batch

CPU = torch.device("cpu")
SIZE = 64
LAYERS = ("pooled", "blocks.2")


@pytest.fixture(scope="module")
def extractor() -> CodeExtractor:
    backbone = create_backbone("timm/tf_efficientnet_lite0", "packaged", SIZE)
    return CodeExtractor(backbone, LAYERS).eval()


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One empty cache for this module's tests: the first exports the graph."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home / "tlflow" / "graphs"


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_onnxruntime_codes_are_torchs_within_float_tolerance_and_the_graph_is_kept(
        extractor: CodeExtractor, cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture):
    cfg = Extract(layers=LAYERS, batch_size=8)
    assert runtime.effective_runtime(cfg, CPU) == "onnxruntime"  # auto on a CPU
    model = runtime.code_model(extractor, SIZE, cfg, CPU)
    assert isinstance(model, runtime.OrtCodes)
    assert [p.suffix for p in cache.iterdir()] == [".onnx"]  # one graph, in the user's cache
    said = capsys.readouterr()
    assert said.out == "" and "exporting layers pooled, blocks.2" in said.err  # predict's
    # stdout is its CSV

    x = _images(8, 1)
    got = encode(model, x, CPU, cfg.precision)
    with torch.inference_mode():
        want = {k: v.numpy() for k, v in extractor(x).items()}
    for layer in LAYERS:
        assert got[layer].shape == want[layer].shape and got[layer].dtype == np.float32
        np.testing.assert_allclose(got[layer], want[layer], atol=1e-4, rtol=1e-4)
        assert not np.array_equal(got[layer], want[layer])  # another runtime's sums

    def no_export(*_):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "_export", no_export)  # the kept graph is read, not remade
    again = encode(runtime.code_model(extractor, SIZE, cfg, CPU), x, CPU, cfg.precision)
    np.testing.assert_array_equal(again["pooled"], got["pooled"])


def test_an_images_codes_do_not_depend_on_its_batch_nor_the_thread_count(
        extractor: CodeExtractor, cache: Path):
    """What lets the local and the sharded executors, and a resumed run, agree bit for bit:
    every batch padded to one shape, and ORT's sums the same on 1 and 2 threads."""
    cfg = Extract(layers=LAYERS, batch_size=8)
    x = _images(8, 2)
    codes, before = {}, torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = runtime.code_model(extractor, SIZE, cfg, CPU)
            codes[threads] = encode_batch(model, x, cfg, CPU)
            alone = encode_batch(model, x[5:6], cfg, CPU)  # padded with zero images
            for layer in LAYERS:
                np.testing.assert_array_equal(alone[layer][0], codes[threads][layer][5])
    finally:
        torch.set_num_threads(before)
    for layer in LAYERS:
        np.testing.assert_array_equal(codes[1][layer], codes[2][layer])


@pytest.mark.faults  # a read-only HOME, a full disk: as the fault suite's others (make faults)
def test_an_unwritable_cache_makes_the_graph_in_memory(extractor: CodeExtractor,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    import errno
    import tempfile

    cfg = Extract(layers=LAYERS, batch_size=4)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # as a read-only HOME: nothing can be made under it
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    model = runtime.code_model(extractor, SIZE, cfg, CPU)
    assert encode(model, _images(2, 3), CPU, cfg.precision)["pooled"].shape == (2, 1280)
    assert blocked.read_text() == "not a folder"

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "full"))  # the folder can be made,
    monkeypatch.setattr(tempfile, "mkstemp", full)  # its file not written: a full disk
    model = runtime.code_model(extractor, SIZE, cfg, CPU)
    assert encode(model, _images(2, 3), CPU, cfg.precision)["pooled"].shape == (2, 1280)
    assert list((tmp_path / "full").rglob("*.onnx")) == []


@pytest.mark.faults  # a damaged file in the user cache (make faults)
def test_a_damaged_graph_in_the_cache_is_made_again(extractor: CodeExtractor, cache: Path):
    runtime.code_model(extractor, SIZE, Extract(layers=LAYERS), CPU)  # kept (or made) here
    (kept,) = cache.iterdir()
    kept.write_bytes(b"not a graph")
    model = runtime.code_model(extractor, SIZE, Extract(layers=LAYERS), CPU)
    assert encode(model, _images(1, 4), CPU, "auto")["pooled"].shape == (1, 1280)
    assert kept.read_bytes()[:8] != b"not a gr"


def test_the_graphs_key_names_the_model_not_only_its_weights():
    """Two timm models of the same weights' shapes and seed, but other batch-norm eps and
    padding (efficientnet_lite0 and its TensorFlow port): their graphs are not each other's."""
    a = create_backbone("timm/efficientnet_lite0", "none", SIZE, seed=0)
    b = create_backbone("timm/tf_efficientnet_lite0", "none", SIZE, seed=0)
    ka, kb = (runtime.graph_key(CodeExtractor(x, ("pooled",)), SIZE) for x in (a, b))
    assert ka != kb
    assert ka == runtime.graph_key(CodeExtractor(a, ("pooled",)), SIZE)  # and stable
    assert ka != runtime.graph_key(CodeExtractor(a, ("pooled",)), 2 * SIZE)
    assert ka != runtime.graph_key(CodeExtractor(a, ("pooled", "blocks.2")), SIZE)


@pytest.mark.parametrize(("over", "device", "message"), [
    ({"runtime": "onnxruntime", "precision": "bf16"}, "cpu", "computes in fp32"),
    ({"runtime": "onnxruntime"}, "cuda", "runs on the CPU"),
])
def test_a_runtime_that_cannot_run_is_one_line(over: dict, device: str, message: str):
    with pytest.raises(TlflowError, match=message) as err:
        runtime.effective_runtime(Extract(**over), torch.device(device))
    assert "\n" not in str(err.value) and str(err.value).startswith("extract.runtime: ")


def test_a_precision_by_name_or_a_gpu_keeps_torch():
    for cfg, device in ((Extract(precision="fp32"), CPU), (Extract(precision="bf16"), CPU),
                        (Extract(runtime="torch"), CPU),
                        (Extract(precision="bf16"), torch.device("cuda"))):
        assert runtime.effective_runtime(cfg, device) == "torch"
    assert runtime.code_precision(Extract(), CPU) == "fp32"
    assert runtime.code_precision(Extract(precision="bf16"), CPU) == "bf16"
