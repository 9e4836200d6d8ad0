"""The GPU check: tlflow's own code paths on one CUDA GPU, a table of figures, exit 1 on a failure.

    bench/gpu_check.sh            (or: python bench/gpu_check.py [--images 2000] [--size 224])

Checks, in one run (a few minutes on one GPU; 8 at most is the budget):
  1. codes on CUDA against the CPU's, 64 real photos (extraction.compute_codes): max abs
     difference in fp32 and in bf16 autocast;
  2. the extract stage on ~2,000 real photos at 224 px against the forward-only limit
     (CodeExtractor on decoded batches already on the GPU) and the decode-only limit (the
     stage's own loader without the network), measured in the same run: ratios;
  3. the out-of-memory path: the allocator capped (torch.cuda.set_per_process_memory_fraction)
     below what the batch needs; the stage must halve its batch (extraction.encode), count
     the OOMs, compute every code, and store the codes check 2 stored;
  4. fine-tuning as DDP over nccl with one process under torchrun (tasks/finetune.launch),
     end to end on hymenoptera, then evaluate;
  5. fine-tuning throughput: one epoch of finetune.loop.train_epoch (decoding, augmentation,
     bf16 autocast) in images per second, against train steps alone on batches already on
     the GPU.

Real images: ../shared/datasets/hymenoptera, 398 photos; check 2 cycles them to ~2,000 as
mirrored, flipped and rotated copies (each copy's bytes differ: the store is addressed by
content and would compute an exact copy once).

Without a CUDA GPU it prints "no CUDA GPU" and exits 0. `--smoke` runs the same code on the
CPU at small sizes (check 3 skipped), to test this script where there is no GPU; its figures
mean nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
BACKBONE = "timm/tf_efficientnet_lite0"
# criteria; fp32 on CUDA runs convolutions in TF32 (torch's default for cuDNN)
FP32_TOLERANCE, BF16_TOLERANCE = 2e-2, 1.5e-1
VARIANTS = ("orig", "mirror", "flip", "rot90", "rot180", "rot270")


class Table:
    """Rows of (check, figure, criterion, ok); printed at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool | None]] = []

    def add(self, check: str, figure: str, criterion: str = "", ok: bool | None = None) -> None:
        self.rows.append((check, figure, criterion, ok))
        mark = {True: "pass", False: "FAIL", None: ""}[ok]
        print(f"  {check}: {figure} {criterion} {mark}".rstrip(), flush=True)

    def print(self) -> bool:
        print("\n| check | measured | criterion | result |\n|---|---|---|---|")
        for check, figure, criterion, ok in self.rows:
            print(f"| {check} | {figure} | {criterion} | "
                  f"{ {True: 'pass', False: 'FAIL', None: '-'}[ok]} |")
        return all(ok is not False for *_, ok in self.rows)


def _variant(job: tuple[Path, str, Path]) -> None:
    from PIL import Image, ImageOps

    src, variant, out = job
    img = Image.open(src).convert("RGB")
    img = {"orig": lambda i: i, "mirror": ImageOps.mirror, "flip": ImageOps.flip,
           "rot90": lambda i: i.rotate(90, expand=True),
           "rot180": lambda i: i.rotate(180),
           "rot270": lambda i: i.rotate(270, expand=True)}[variant](img)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, quality=92)


def make_images(dest: Path, n: int) -> Path:
    """dest/<ants|bees>/<variant>_<split>_<name>.jpg: n photos, the 398 cycled as variants."""
    sources = sorted(HYMENOPTERA.rglob("*.jpg"))
    random.Random(0).shuffle(sources)  # ants and bees in any first n
    jobs = [(src, v, dest / src.parent.name / f"{v}_{src.parent.parent.name}_{src.name}")
            for v in VARIANTS for src in sources][:n]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_variant, jobs, chunksize=16))
    return dest


def _quiet(fn: Callable, *args, **kwargs):
    """Run a stage with its lines kept (printed only if it fails)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return fn(*args, **kwargs)
    except BaseException:
        print(out.getvalue(), flush=True)
        raise


def _guarded(table: Table, name: str, check: Callable, *args):
    """Run one check; an exception is a FAIL row (its traceback printed), not the end of the
    run: the other checks still report."""
    try:
        return check(table, *args)
    except Exception as err:
        traceback.print_exc()
        table.add(name, f"error: {type(err).__name__}: {' '.join(str(err).split())[:200]}",
                  "runs", False)
        return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. codes across devices


def check_codes(table: Table, files: list[Path], size: int, device) -> None:
    import numpy as np
    import torch

    from tlflow.tasks.lib.core.params import Extract
    from tlflow.tasks.lib.features.backbones import create_backbone
    from tlflow.tasks.lib.features.extraction import compute_codes

    backbone = create_backbone(BACKBONE, "packaged", size)
    cpu = np.stack(compute_codes(files, backbone, "pooled",  # torch's fp32 on the CPU
                                 Extract(batch_size=32, precision="fp32"),
                                 torch.device("cpu")))
    scale = float(np.abs(cpu).max())
    for precision, tolerance in (("fp32", FP32_TOLERANCE), ("bf16", BF16_TOLERANCE)):
        got = np.stack(compute_codes(files, backbone, "pooled",
                                     Extract(batch_size=32, precision=precision), device))
        diff = np.abs(got - cpu)
        table.add(f"codes {device.type} vs cpu, {precision}, {len(files)} photos",
                  f"max abs diff {diff.max():.2e} (mean {diff.mean():.1e}; codes up to "
                  f"{scale:.2f})", f"<= {tolerance:g}", bool(diff.max() <= tolerance))


# ---------------------------------------------------------------- 2. extraction throughput


def _project(work: Path, images: Path, size: int, device, **extract) -> object:
    from tlflow.tasks.lib.core.params import params_under

    return params_under(work, ROOT / "params.yaml",
                        ingest={"source": "folder", "path": str(images)},
                        extract={"image_size": size, "layers": ["pooled"],
                                 "device": device.type, **extract})


def _forward_rate(params, files: list[Path], device, batch: int) -> float:
    """Forward passes alone, bf16 autocast as the stage, batches already on the device."""
    import torch

    from tlflow.tasks.lib.core.device import autocast
    from tlflow.tasks.lib.data.decode import read_image
    from tlflow.tasks.lib.features.backbones import create_backbone
    from tlflow.tasks.lib.features.codes import CodeExtractor

    cfg = params.extract
    backbone = create_backbone(BACKBONE, "packaged", cfg.image_size)
    model = CodeExtractor(backbone, cfg.layers).to(device, memory_format=torch.channels_last)
    transform = backbone.transform()
    x = torch.stack([read_image(f, transform) for f in files[:batch]])
    x = x.to(device, memory_format=torch.channels_last)
    reps = max(1, 2048 // batch) if device.type == "cuda" else 1
    with torch.inference_mode(), autocast(device, cfg.precision):
        model(x)  # warm-up (cuDNN's choice of kernels)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        _sync(device)
    return reps * len(x) / (time.perf_counter() - t0)


def _decode_rate(params, files: list[Path], device) -> float:
    """The stage's own loader (its workers, pinned memory) without the network."""
    from tlflow.tasks.lib.features.backbones import create_backbone
    from tlflow.tasks.lib.features.extraction import make_loader

    backbone = create_backbone(BACKBONE, "packaged", params.extract.image_size)
    t0 = time.perf_counter()
    n = sum(len(b.indices) for b in make_loader(files, backbone, params.extract, device))
    return n / (time.perf_counter() - t0)


def check_extraction(table: Table, work: Path, images: Path, size: int, device):
    from tlflow.tasks import extract, ingest

    params = _project(work, images, size, device)
    rows = _quiet(ingest.run, params)
    n = len({r.sha256 for r in rows})
    t0 = time.perf_counter()
    _quiet(extract.run, params)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    _quiet(extract.run, params)  # nothing left to compute: the stage's fixed cost
    startup = time.perf_counter() - t0
    stage = n / max(total - startup, 1e-9)
    files = sorted(params.base.paths.images.rglob("*.jpg"))
    forward = _forward_rate(params, files, device, params.extract.batch_size)
    decode = _decode_rate(params, files, device)
    limit = min(forward, decode)
    table.add(f"extract stage, {n} photos at {size} px, batch {params.extract.batch_size}",
              f"{stage:.0f} img/s (start-up {startup:.1f} s apart)")
    table.add("forward-only limit (bf16, batches on the device)", f"{forward:.0f} img/s")
    table.add("decode-only limit (the stage's loader)", f"{decode:.0f} img/s")
    table.add("ratio stage / forward-only", f"{stage / forward:.2f}")
    table.add("ratio stage / min(forward, decode)", f"{stage / limit:.2f}", ">= 0.5",
              stage / limit >= 0.5)
    return params


# ---------------------------------------------------------------- 3. out of memory


def check_oom(table: Table, work: Path, images: Path, size: int, device, reference) -> None:
    import numpy as np
    import torch

    from tlflow.tasks import extract, ingest
    from tlflow.tasks.lib.core.handoff.extract import current_store
    from tlflow.tasks.lib.features.store import FeatureStore

    cap_gib, batch = 1.5, 1024
    params = _project(work, images, size, device, batch_size=batch)
    rows = _quiet(ingest.run, params)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    before = torch.cuda.memory_stats(device).get("num_ooms", 0)
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    try:
        _quiet(extract.run, params)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    ooms = torch.cuda.memory_stats(device).get("num_ooms", 0) - before
    keys = sorted({r.sha256 for r in rows})
    with FeatureStore(current_store(params.base.paths.features)) as got, \
            FeatureStore(current_store(reference.base.paths.features)) as want:
        diff = float(np.abs(got.read("pooled", keys).astype(np.float32)
                            - want.read("pooled", keys).astype(np.float32)).max())
    table.add(f"OOM: batch {batch} at {size} px, allocator capped at {cap_gib} GiB",
              f"{ooms} OOMs caught, {len(keys)} codes", ">= 1 OOM, every code", ooms >= 1)
    table.add("OOM: codes against check 2's (batch 64)", f"max abs diff {diff:.2e}",
              f"<= {BF16_TOLERANCE:g}", diff <= BF16_TOLERANCE)


# ---------------------------------------------------------------- 4. DDP over nccl


def check_ddp(table: Table, work: Path, size: int, device, epochs: int) -> None:
    from tlflow.tasks import evaluate, extract, finetune, ingest, train
    from tlflow.tasks.lib.core.handoff.train import TrainChoice
    from tlflow.tasks.lib.core.params import params_under

    params = params_under(work, ROOT / "params.yaml",
                          ingest={"source": "folder", "path": str(HYMENOPTERA)},
                          extract={"image_size": size, "layers": ["pooled"],
                                   "device": device.type},
                          finetune={"enabled": True, "epochs": epochs, "patience": epochs,
                                    "device": device.type})
    for stage in (ingest, extract, train):
        _quiet(stage.run, params)
    choice = TrainChoice.read(params.base.paths.train_choice)
    if device.type == "cuda":  # the rank is another process: leave it this one's cache
        import torch

        torch.cuda.empty_cache()
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        meta = finetune.launch(params, params.finetune, choice)
    seconds = time.perf_counter() - t0
    text = out.getvalue()
    backend = {"cuda": "nccl", "cpu": "gloo"}[device.type]
    done = meta is not None and text.count(", weights sha256 ") == meta.epochs_run
    if not done:
        print(text, flush=True)
    metrics = _quiet(evaluate.run, params)
    test = metrics["finetune"]["accuracy"]
    table.add(f"DDP over {backend}, 1 process under torchrun, hymenoptera {size} px, "
              f"{epochs} epochs", f"{seconds:.0f} s, val {meta.val_accuracy:.3f}, "
              f"test {test:.3f} (probe {metrics['probe']['accuracy']:.3f})",
              "completes, test >= 0.8", done and test >= 0.8)


# ---------------------------------------------------------------- 5. fine-tuning throughput


def check_training(table: Table, params, device, batch: int) -> None:
    import math

    import torch
    import torch.nn.functional as F

    from tlflow.tasks.lib.core.device import autocast
    from tlflow.tasks.lib.core.params import Finetune
    from tlflow.tasks.lib.data.decode import read_image
    from tlflow.tasks.lib.data.manifest import read_manifest
    from tlflow.tasks.lib.finetune.data import Images, class_indices, train_augment, train_loader
    from tlflow.tasks.lib.finetune.loop import train_epoch
    from tlflow.tasks.lib.finetune.network import build, freeze
    from tlflow.tasks.lib.finetune.optim import make_optimizer, make_schedule

    paths = params.base.paths
    rows = read_manifest(paths.manifest)
    classes = tuple(sorted({r.label for r in rows}))
    net = build(BACKBONE, "packaged", params.extract.image_size, 0, classes)
    net.model.to(device, memory_format=torch.channels_last)
    cfg = Finetune(enabled=True, batch_size=batch, device=device.type, epochs=1)
    freeze(net, cfg)
    ds = Images([paths.images / r.relpath for r in rows],
                class_indices([r.label for r in rows], classes), read_image,
                net.backbone.transform(), train_augment(net, cfg), 0)
    opt = make_optimizer(net, cfg)
    sched = make_schedule(opt, math.ceil(len(ds) / batch), cfg)
    loader = train_loader(ds, cfg, device, 0, 1)
    t0 = time.perf_counter()
    loss = _quiet(train_epoch, net, loader, opt, sched, cfg, device, "gpu check", 0)
    _sync(device)
    epoch = len(ds) / (time.perf_counter() - t0)
    x = torch.randn(batch, 3, params.extract.image_size, params.extract.image_size,
                    device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(classes), (batch,), device=device)
    steps = 10 if device.type == "cuda" else 2
    for i in range(steps + 1):
        if i == 1:  # the first step warms up
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, cfg.precision):
            step_loss = F.cross_entropy(net.model(x), y)
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
    _sync(device)
    alone = steps * batch / (time.perf_counter() - t0)
    table.add(f"fine-tuning epoch ({cfg.trainable}, batch {batch}, {cfg.precision}, "
              f"{len(ds)} photos)", f"{epoch:.0f} img/s, loss {loss:.3f}", "finite loss",
              math.isfinite(loss))
    table.add("train steps alone (batches on the device)", f"{alone:.0f} img/s")
    table.add("ratio epoch / steps alone", f"{epoch / alone:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3, help="of the DDP fine-tuning (check 4)")
    ap.add_argument("--smoke", action="store_true",
                    help="the same code on the CPU at small sizes (no GPU figures)")
    args = ap.parse_args()
    import torch

    if args.smoke:
        device = torch.device("cpu")
        args.images, args.size, args.epochs, n_codes, batch = 96, 64, 1, 8, 16
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing checked (bench/gpu_check.sh needs an NVIDIA GPU)")
        return 0
    else:
        device, n_codes, batch = torch.device("cuda", 0), 64, 64
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"tlflow GPU check on {name}: torch {torch.__version__}", flush=True)
    t_start = time.perf_counter()
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="tlflow-gpu-check-"))
    try:
        images = make_images(work / "images", args.images)
        print(f"{args.images} photos ready ({len(VARIANTS)} variants of the 398)", flush=True)
        _guarded(table, "codes across devices", check_codes,
                 sorted(HYMENOPTERA.rglob("*.jpg"))[:n_codes], args.size, device)
        reference = _guarded(table, "extraction throughput", check_extraction,
                             work / "extract", images, args.size, device)
        if device.type != "cuda":
            table.add("OOM halving", "skipped: needs CUDA")
        elif reference is not None:
            _guarded(table, "OOM halving", check_oom, work / "oom", images, args.size, device,
                     reference)
        _guarded(table, "DDP over nccl", check_ddp, work / "ddp", args.size, device,
                 args.epochs)
        if reference is not None:
            _guarded(table, "fine-tuning throughput", check_training, reference, device, batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = table.print()
    print(f"\n{'all checks passed' if ok else 'a check FAILED'} in "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
