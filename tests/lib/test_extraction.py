"""The extractor's identity and the batched forward pass."""

import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_params
from tests.test_extract import TINY
from tlflow.tasks.lib.core.device import cpu_has_bf16
from tlflow.tasks.lib.features.backbones import create_backbone
from tlflow.tasks.lib.features.extraction import describe_extractor, encode
from tlflow.tasks.lib.features.store import extractor_id


def test_extractor_id_covers_what_changes_a_code(tmp_path: Path):
    def ext_id(**over):
        cfg = make_params(tmp_path, extract={**TINY, **over}).extract
        b = create_backbone(cfg.backbone, cfg.weights, cfg.image_size)
        return extractor_id(describe_extractor(b.identity(), cfg, torch.device("cpu")))

    base = ext_id(precision="fp32")
    assert ext_id(batch_size=1, precision="fp32") == base
    assert ext_id(device="cpu", precision="fp32") == base
    assert ext_id(image_size=48, precision="fp32") != base
    assert ext_id(dtype="float32", precision="fp32") != base
    assert ext_id(layers=["pooled"], precision="fp32") != base
    assert ext_id(weights="none", precision="fp32") != base
    assert ext_id(decode="full", precision="fp32") != base
    assert ext_id(precision="bf16") != base
    # pinned: a change here means every user's stores are recomputed, so it must be meant
    # (the decoding rules viewer/2 changed it; the switch from hooks to forward_intermediates
    # did not: the codes are the hooks' bit for bit, tests/lib/test_backbones.py). Decoding
    # every pixel in fp32 keeps the id from before extract.decode and precision auto, so the
    # stores and heads users have stay valid
    assert base == "1514b06775e4d565"
    assert ext_id(decode="full", precision="fp32") == "21373ceb18ccc993"


def test_oom_halves_the_batch():
    import torch

    class Picky(torch.nn.Module):
        sizes: typing.ClassVar[list[int]] = []

        def forward(self, x):
            self.sizes.append(len(x))
            if len(x) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return {"pooled": x.flatten(1)[:, :3]}

    x = torch.arange(7 * 3 * 2 * 2, dtype=torch.float32).reshape(7, 3, 2, 2)
    out = encode(Picky(), x, torch.device("cpu"), "fp32")
    np.testing.assert_array_equal(out["pooled"], x.flatten(1)[:, :3].numpy())
    assert max(Picky.sizes) == 7 and Picky.sizes.count(7) == 1


def test_the_extractor_id_covers_the_precision_not_the_device(tmp_path: Path):
    """bf16 and fp16 codes differ from fp32 ones (up to 5e-2): each gets its own store, on
    the CPU as on CUDA. fp16 on the CPU computes fp32, and fp32 codes agree across devices."""
    cfg = make_params(tmp_path, extract=TINY).extract
    b = create_backbone(cfg.backbone, cfg.weights, cfg.image_size)

    def ext_id(device: str, precision: str, runtime: str = "auto") -> str:
        c = cfg.model_copy(update={"precision": precision, "runtime": runtime})
        return extractor_id(describe_extractor(b.identity(), c, torch.device(device)))

    fp32 = ext_id("cpu", "fp32")
    assert ext_id("cpu", "fp16") == ext_id("cuda", "fp32") == fp32
    assert ext_id("cpu", "bf16") == ext_id("cuda", "bf16") != fp32
    assert len({fp32, ext_id("cuda", "bf16"), ext_id("cuda", "fp16")}) == 3
    torch_auto = ext_id("cpu", "auto", "torch")
    assert torch_auto == (ext_id("cpu", "bf16") if cpu_has_bf16() else fp32)
    # auto on a CPU: fp32 in ONNX Runtime, its own store (its codes are not torch's bit
    # for bit); the runtime asked by name gives the same id
    ort = ext_id("cpu", "auto")
    assert ort == ext_id("cpu", "fp32", "onnxruntime") == ext_id("cpu", "auto", "onnxruntime")
    assert ort not in {fp32, torch_auto, ext_id("cpu", "bf16")}
    assert ext_id("cuda", "bf16") == ext_id("cuda", "bf16", "torch")  # a GPU: torch


def test_images_decoded_in_threads_keep_order_errors_and_stop():
    import threading

    from tlflow.tasks.lib.features.extraction import decoded_in_threads

    class Files:  # ImageFiles' contract: (index, image or None, error or None)
        def __init__(self, n: int, broken: int = -1) -> None:
            self.n, self.broken, self.read = n, broken, []

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int):
            self.read.append(i)
            if i == self.broken:
                raise ValueError("a bug, not a bad file")
            if i % 7 == 3:
                return i, None, f"file {i}: unreadable"
            return i, torch.full((1, 2, 2), float(i)), None

    batches = list(decoded_in_threads(Files(50), 8, 3))
    assert [len(b.indices) + len(b.errors) for b in batches] == [8] * 6 + [2]
    assert [i for b in batches for i in b.indices] == [i for i in range(50) if i % 7 != 3]
    assert [i for b in batches for i, _ in b.errors] == [i for i in range(50) if i % 7 == 3]
    for b in batches:  # each image where its index says
        assert [float(x[0, 0, 0]) for x in b.images] == [float(i) for i in b.indices]

    got = []
    with pytest.raises(ValueError, match="a bug"):
        for b in decoded_in_threads(Files(40, broken=20), 8, 2):
            got.append(b)
    assert len(got) == 2  # the batches before the broken one's were handed over

    files = Files(10_000)
    for n, _ in enumerate(decoded_in_threads(files, 8, 2, depth=2)):
        if n == 3:
            break  # the consumer leaves: what has not started is cancelled, threads joined
    assert not any(t.name.startswith("tlflow-decode") for t in threading.enumerate())
    assert len(files.read) <= 8 * (3 + 1 + 2)  # at most depth batches ahead
