"""Extraction speed and memory against the tutorial loop, side by side in one run.

Each way runs in a fresh process on the same images, so its peak RSS is its own:

  tutorial     PyTorch's transfer-learning tutorial loop: torchvision ImageFolder +
               DataLoader (batch 32, no workers: the cores compute), the same timm network and
               eval transform, fp32, every JPEG pixel decoded
  fp32 full    the extract stage, extract.precision fp32, extract.decode full (torch's eager
               pass: tlflow before bf16, scaled decoding and ONNX Runtime)
  fp32         the extract stage, torch fp32, scaled JPEG decoding (extract.decode: scaled)
  bf16         the extract stage, torch bf16 autocast (the default before ONNX Runtime on a
               CPU with AMX or AVX512-BF16), scaled decoding
  auto         the extract stage with its defaults (runtime auto: ONNX Runtime fp32 on a CPU;
               scaled decoding), its graph already in the cache (the export, once per
               backbone, layers and size, is timed apart)

and the forward-only limit of each (pre-decoded tensors, batch 32 as the stage: torch fp32 and
bf16 in channels_last, ONNX Runtime fp32).
Two image sets: the hymenoptera photos (398, about 500 x 375) and N 12-megapixel JPEGs made
from them (upscaled to 4000 x 3000, quality 92). Ratios are printed last.

    python bench/extract.py [--big 40] [--decode-workers]

--decode-workers also times the stage on the photos with extract.num_workers null (the CPU's
default: a pool of decoding threads, one per core, beside the forward pass), 0 (decoding in
turn with it) and 1 (a decoder process, the forward pass on the cores left), the measurement
behind the default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
MODEL = "timm/tf_efficientnet_lite0"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def photos(dest: Path) -> Path:
    """The hymenoptera photos in class folders (train and val together)."""
    for src in sorted(HYMENOPTERA.rglob("*.jpg")):
        out = dest / src.parent.name / f"{src.parent.parent.name}_{src.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())
    return dest


def big_jpegs(dest: Path, n: int) -> Path:
    """n 12-megapixel JPEGs (4000 x 3000, quality 92) upscaled from the photos."""
    from PIL import Image

    for src in sorted(HYMENOPTERA.rglob("*.jpg"))[::7][:n]:
        out = dest / src.parent.name / f"big_{src.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im.convert("RGB").resize((4000, 3000), Image.BICUBIC).save(out, quality=92)
    return dest


# ---------------------------------------------------------------- one way, in its own process


def tutorial(folder: Path) -> dict[str, float]:
    """ImageFolder + DataLoader + the network in fp32, as the tutorial writes it; timed from
    the libraries imported, its network built within (as the stage)."""
    import torch
    from torchvision import datasets

    from tlflow.tasks.lib.features.backbones import create_backbone

    t0 = time.perf_counter()
    backbone = create_backbone(MODEL, "packaged", None, 0)
    model = backbone.model.eval()
    ds = datasets.ImageFolder(str(folder), transform=backbone.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=0)
    start = time.perf_counter()
    codes = []
    with torch.no_grad():
        for x, _ in loader:
            codes.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return {"n": len(ds), "seconds": time.perf_counter() - t0, "setup": start - t0}


def stage(folder: Path, work: Path, precision: str, decode: str, workers: int | None,
          batch_size: int | None = None, runtime: str = "auto") -> dict[str, float]:
    """The extract stage (ingest first, untimed), layers pooled only, at 224 px; timed from
    the libraries imported (timm, as the tutorial's), its network built within."""
    import timm  # noqa: F401  (imported before the clock, as for the tutorial)

    from tlflow.tasks import extract, ingest
    from tlflow.tasks.lib.core.params import params_under

    params = params_under(work, ROOT / "params.yaml",
                          ingest={"source": "folder", "path": str(folder)},
                          extract={"layers": ["pooled"], "image_size": 224,
                                   "precision": precision, "decode": decode,
                                   "num_workers": workers, "runtime": runtime,
                                   **({"batch_size": batch_size} if batch_size else {})})
    rows = ingest.run(params)
    t0 = time.perf_counter()
    extract.run(params)
    return {"n": len(rows), "seconds": time.perf_counter() - t0}


def forward_limit(precision: str, runtime: str) -> dict[str, float]:
    """Images per second of forward passes alone, batch 32 at 224 px, as the stage computes
    them (features.runtime.code_model: channels_last for torch, ONNX Runtime's session), the
    graph's export (ONNX Runtime, when not in the cache yet) timed apart."""
    import torch

    from tlflow.tasks.lib.core.device import autocast, set_cpu_threads
    from tlflow.tasks.lib.core.params import Extract
    from tlflow.tasks.lib.features.backbones import create_backbone
    from tlflow.tasks.lib.features.codes import CodeExtractor
    from tlflow.tasks.lib.features.runtime import code_model

    cpu = torch.device("cpu")
    set_cpu_threads(cpu, 0)
    cfg = Extract(precision=precision, runtime=runtime, layers=("pooled",))
    t0 = time.perf_counter()
    model = code_model(CodeExtractor(create_backbone(MODEL, "packaged", None, 0), ("pooled",)),
                       224, cfg, cpu)
    made = time.perf_counter() - t0
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(cpu, precision):
        model(x)  # warm-up: oneDNN picks its kernels
        t0 = time.perf_counter()
        for _ in range(6):
            model(x)
        return {"n": 192, "seconds": time.perf_counter() - t0, "made": made}


def one(args: argparse.Namespace) -> None:
    """Run one way (in this process) and print its JSON line."""
    import torch

    if args.way == "tutorial":
        out = tutorial(args.folder)
    elif args.way.startswith("forward"):
        out = forward_limit(args.precision, args.runtime)
    else:
        out = stage(args.folder, args.work, args.precision, args.decode, args.workers,
                    args.batch_size, args.runtime)
    out |= {"rss": peak_rss_mib(), "threads": torch.get_num_threads()}
    print(json.dumps(out))


def run_way(*argv: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--one", *argv], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the side-by-side run


def measure(folder: Path, work: Path) -> dict[str, dict[str, float]]:
    ways = {"tutorial": ("tutorial",), "fp32 full": ("stage", "fp32", "full"),
            "fp32": ("stage", "fp32", "scaled"), "bf16": ("stage", "bf16", "scaled"),
            "auto": ("stage", "auto", "scaled")}
    out = {}
    for name, (way, *rest) in ways.items():
        argv = ["--way", way, "--folder", str(folder), "--work", str(work / name.replace(" ", "-"))]
        if rest:
            argv += ["--precision", rest[0], "--decode", rest[1]]
        out[name] = run_way(*argv)
    return out


def table(title: str, res: dict[str, dict[str, float]]) -> None:
    base = res["tutorial"]
    print(f"\n{title}: {base['n']} images")
    print(f"  {'way':<10} {'img/s':>8} {'seconds':>8} {'peak RSS MiB':>13} {'speed-up':>9} "
          f"{'RSS ratio':>10}")
    for name, r in res.items():
        rate = r["n"] / r["seconds"]
        print(f"  {name:<10} {rate:8.1f} {r['seconds']:8.1f} {r['rss']:13.0f} "
              f"{base['seconds'] / r['seconds']:8.2f}x {r['rss'] / base['rss']:10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=int, default=40,
                    help="12-megapixel JPEGs to make (at most 57: every 7th photo)")
    ap.add_argument("--decode-workers", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--way", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--decode", default="scaled", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=lambda v: None if v == "null" else int(v),
                    default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    if not HYMENOPTERA.is_dir():
        sys.exit(f"bench: needs the photos at {HYMENOPTERA}")
    import torch

    from tlflow.tasks.lib.core.device import cpu_has_bf16
    from tlflow.tasks.lib.core.params import Extract
    from tlflow.tasks.lib.features.runtime import effective_runtime

    runtime = effective_runtime(Extract(), torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 in hardware: "
          f"{cpu_has_bf16()}; runtime auto = {runtime}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = photos(tmp / "photos")
        big = big_jpegs(tmp / "big", args.big)
        # ONNX Runtime's first: its graph is exported (timed) into the cache the stage reads
        limits = {name: run_way("--way", "forward", "--precision", p, "--runtime", r)
                  for name, p, r in (("onnxruntime fp32", "auto", "auto"),
                                     ("torch fp32", "fp32", "torch"),
                                     ("torch bf16", "bf16", "torch"))}
        res_small = measure(small, tmp / "w-small")
        res_big = measure(big, tmp / "w-big")
        workers = {w: run_way("--way", "stage", "--folder", str(small), "--work",
                              str(tmp / f"w-workers-{w}"), "--precision", "auto",
                              "--workers", w)
                   for w in (("null", "0", "1") if args.decode_workers else ())}
    for name, r in limits.items():
        print(f"forward only, {name:<16}: {r['n'] / r['seconds']:6.1f} img/s "
              f"(model made in {r['made']:.1f} s)")
    table("hymenoptera photos", res_small)
    table("12-megapixel JPEGs", res_big)
    for w, r in workers.items():
        print(f"extract.num_workers {w:<4}: {r['n'] / r['seconds']:5.1f} img/s "
              f"(torch threads {r['threads']}), peak RSS {r['rss']:.0f} MiB")
    print()
    for title, res in (("photos", res_small), ("12-MP JPEGs", res_big)):
        t, a = res["tutorial"], res["auto"]
        print(f"ratio {title}: auto / tutorial speed {t['seconds'] / a['seconds']:.2f}x, "
              f"bf16 / tutorial {t['seconds'] / res['bf16']['seconds']:.2f}x, "
              f"fp32 / tutorial {t['seconds'] / res['fp32']['seconds']:.2f}x, "
              f"peak RSS auto / tutorial {a['rss'] / t['rss']:.2f}")
    rate = {name: r["n"] / r["seconds"] for name, r in limits.items()}
    print(f"ratio forward only: onnxruntime fp32 / torch fp32 "
          f"{rate['onnxruntime fp32'] / rate['torch fp32']:.2f}x, torch bf16 / torch fp32 "
          f"{rate['torch bf16'] / rate['torch fp32']:.2f}x")


if __name__ == "__main__":
    main()
