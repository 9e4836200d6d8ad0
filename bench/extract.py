"""Extraction throughput, measured side by side in one run; ratios printed last.

(a) forward passes on pre-decoded tensors, contiguous and channels_last;
(b) decode + preprocess alone;
(c) the extract stage on the same files (fixed start-up reported apart).
On a CPU the decoders and the network share the cores, so the limit is 1/(1/a + 1/b).

    python bench/extract.py [--images 1600] [--batch-size 64] [--image-size 224]

Images: ../shared/datasets/hymenoptera with mirrored, flipped and rotated copies.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
VARIANTS = {
    "orig": lambda im: im,
    "mirror": ImageOps.mirror,
    "flip": ImageOps.flip,
    "rot90": lambda im: im.rotate(90, expand=True),
}


def make_images(dest: Path, n: int) -> Path:
    """Up to n real photos: hymenoptera plus mirrored, flipped and rotated copies."""
    sources = sorted(HYMENOPTERA.rglob("*.jpg"))
    count = 0
    for name, fn in VARIANTS.items():
        for src in sources:
            if count >= n:
                return dest
            label = src.parent.name
            out = dest / label / f"{name}_{src.parent.parent.name}_{src.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            fn(Image.open(src).convert("RGB")).save(out, quality=92)
            count += 1
    return dest


def forward_rate(model, x: torch.Tensor, batch: int, channels_last: bool) -> float:
    """Images per second of forward passes alone."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    with torch.inference_mode():
        model(x[:batch].contiguous(memory_format=fmt))  # warm-up
        t0 = time.perf_counter()
        for b in x.split(batch):
            model(b.contiguous(memory_format=fmt))
        return len(x) / (time.perf_counter() - t0)


def decode_rate(files: list[Path], transform) -> float:
    """Images per second of decode + preprocess alone."""
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            transform(im.convert("RGB"))
    return len(files) / (time.perf_counter() - t0)


def import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, timm"], check=True)
    return time.perf_counter() - t0


def add_new_images(folder: Path, n: int) -> None:
    """n new photos: rotated by 270 degrees, bytes no store has seen."""
    for src in sorted(HYMENOPTERA.rglob("*.jpg"))[:n]:
        out = folder / src.parent.name / f"rot270_{src.parent.parent.name}_{src.name}"
        Image.open(src).convert("RGB").rotate(270, expand=True).save(out, quality=92)


def stage_rate(folder: Path, work: Path, batch: int, size: int) -> dict[str, float]:
    """The extract stage on the folder: steady rate, start-up, and the cost of 1% new images."""
    from tlflow.tasks import extract, ingest
    from tlflow.tasks.lib.params import params_under

    params = params_under(work, ROOT / "params.yaml",
                          ingest={"source": "folder", "path": str(folder)},
                          extract={"layers": ["pooled", "blocks.4"], "image_size": size,
                                   "batch_size": batch})
    rows = ingest.run(params)
    t0 = time.perf_counter()
    extract.run(params)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    extract.run(params)  # nothing to compute: the stage's fixed cost
    startup = time.perf_counter() - t0
    n = len({r.sha256 for r in rows})
    n_new = max(1, n // 100)
    add_new_images(folder, n_new)
    ingest.run(params)
    t0 = time.perf_counter()
    extract.run(params)
    incremental = time.perf_counter() - t0
    return {"rate": n / (total - startup), "startup": startup, "n": n, "full": total,
            "n_new": n_new, "incremental": incremental}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--forward-images", type=int, default=256)
    args = ap.parse_args()

    from tlflow.tasks.lib.backbones import CodeExtractor, create_backbone

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(Path(tmp) / "images", args.images)
        files = sorted(folder.rglob("*.jpg"))
        backbone = create_backbone("timm/tf_efficientnet_lite0", "packaged", args.image_size)
        model = CodeExtractor(backbone, ("pooled", "blocks.4"))
        transform = backbone.transform()
        b = decode_rate(files, transform)
        x = torch.stack([transform(Image.open(f).convert("RGB"))
                         for f in files[: args.forward_images]])
        a_plain = forward_rate(model, x, args.batch_size, channels_last=False)
        a = forward_rate(model, x, args.batch_size, channels_last=True)
        st = stage_rate(folder, Path(tmp) / "work", args.batch_size, args.image_size)
    c, startup, n = st["rate"], st["startup"], st["n"]
    limit = 1 / (1 / a + 1 / b)
    budget = 0.05 * st["full"] + 2.0
    print(f"images: {n} at {args.image_size} px, batch {args.batch_size}")
    print(f"(a) forward, contiguous        {a_plain:8.1f} img/s")
    print(f"(a) forward, channels_last     {a:8.1f} img/s")
    print(f"(b) decode + preprocess        {b:8.1f} img/s")
    print(f"(c) extract stage, steady      {c:8.1f} img/s")
    print(f"    stage start-up (model load) {startup:7.2f} s; import torch+timm "
          f"{import_seconds():.2f} s")
    print(f"    limit 1/(1/a + 1/b)        {limit:8.1f} img/s")
    print(f"    full extraction {st['full']:.1f} s; +{st['n_new']} new images (1%) "
          f"{st['incremental']:.2f} s; budget 0.05 x full + 2 s = {budget:.1f} s")
    print(f"ratio channels_last / contiguous forward: {a / a_plain:.2f}")
    print(f"ratio incremental / full: {st['incremental'] / st['full']:.3f}  "
          f"(within budget: {st['incremental'] <= budget})")
    print(f"ratio stage / limit: {c / limit:.2f}  (goal >= 0.85)")


if __name__ == "__main__":
    main()
