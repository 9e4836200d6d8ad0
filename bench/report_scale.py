"""The report at scale: `write_report` on a project whose test split holds N images (default
20,000), its size and build time, to check that the page stays small enough to open.

    python bench/report_scale.py DIR [--images 20000] [--classes 10]

DIR gets a synthetic project state, written with tlflow's own writers: N small PNGs in ten
colour classes (their thumbnails are real), a feature store of N 64-D codes in ten clusters,
the manifest, train's probe report and evaluate's outputs for a probe right on 90 % of them.
No stage runs: what is measured is the report alone. It builds twice: from scratch (t-SNE
on the sampled codes, every thumbnail made) and again with both kept.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_state(dest: Path, n: int, classes: int):
    """The project's files for a probe scored on n test images; its Paths."""
    from types import SimpleNamespace

    from PIL import Image

    from tlflow.tasks.lib.core.handoff import evaluate, extract, train
    h = SimpleNamespace(**vars(extract), **vars(train), **vars(evaluate))
    from tlflow.tasks.lib.core.params import params_under
    from tlflow.tasks.lib.data.manifest import Row, write_manifest
    from tlflow.tasks.lib.features.store import FeatureStore

    paths = params_under(dest, ROOT / "params.yaml").base.paths
    rng = np.random.default_rng(0)
    labels = [f"c{i % classes}" for i in range(n)]
    rows, keys = [], []
    for i, label in enumerate(labels):
        rel = f"{label}/{i:05d}.png"
        pixels = np.full((8, 8, 3), 25 * (i % classes), np.uint8) + rng.integers(0, 20, (8, 8, 3),
                                                                               dtype=np.uint8)
        (paths.images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(paths.images / rel)
        sha = hashlib.sha256((paths.images / rel).read_bytes()).hexdigest()
        rows.append(Row(rel, sha, label, "test"))
        keys.append(sha)
    write_manifest(rows, paths.manifest)
    centres = rng.normal(0, 4, (classes, 64))
    codes = centres[[i % classes for i in range(n)]] + rng.normal(0, 1, (n, 64))
    store = paths.features / "0123456789abcdef.h5"
    paths.features.mkdir(parents=True, exist_ok=True)
    with FeatureStore.create(store, {"bench": "report_scale"}, {"pooled": 64}, "float16") as s:
        s.append(keys, {"pooled": codes.astype(np.float32)})
    h.Pointer(extractor_id=store.stem, store=store.name,
              extractor={"bench": "report_scale"}).write_to(paths.features)
    row = h.SweepRow(layer="pooled", dim=64, C=1.0, val_accuracy=0.9)
    h.ProbeReport(best=h.ProbeChoice(classifier="logistic", layer="pooled", C=1.0,
                                     val_accuracy=0.9, extractor_id=store.stem),
                  layers=(row,), sweep=(row,)).write(paths.probe_report)
    names = sorted(set(labels))
    preds, right = [], rng.random(n) < 0.9
    for r, ok in zip(rows, right, strict=True):
        top = r.label if ok else names[(names.index(r.label) + 1) % classes]
        preds.append(h.ImagePrediction(model="probe", relpath=r.relpath, sha256=r.sha256,
                                       label=r.label, top=(top,), scores=(0.8,),
                                       kind="probability", loss=0.2 if ok else 1.6,
                                       correct=bool(ok)))
    h.Predictions(rows=tuple(preds), k=1).write(paths.predictions)
    acc = float(right.mean())
    h.EvalMetrics(probe=h.Scores(accuracy=acc, macro_f1=acc, n=n)).write(paths.eval_metrics)
    h.PerClass(rows=tuple(h.ClassScores(model="probe", label=c, precision=acc, recall=acc,
                                        f1=acc, support=n // classes) for c in names)
               ).write(paths.per_class)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    from tlflow.flows.html_report import write_report

    t0 = time.perf_counter()
    paths = build_state(args.dir.resolve(), args.images, args.classes)
    print(f"state: {args.images} test images, {args.classes} classes, "
          f"{time.perf_counter() - t0:.1f} s")
    for build in ("from scratch", "kept"):
        t0 = time.perf_counter()
        written = write_report(paths, {})
        seconds = time.perf_counter() - t0
        thumbs = sum(f.stat().st_size for f in (paths.report.parent / "thumbs").iterdir())
        print(f"report {build}: {seconds:.1f} s, page {paths.report.stat().st_size / 1024:.1f} "
              f"KB, {written.thumbnails} thumbnails ({thumbs / 2**20:.1f} MB beside it)")


if __name__ == "__main__":
    main()
