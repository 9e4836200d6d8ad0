"""The report's claims on real photos (hymenoptera at 224 px), measured in one run.

(1) the gallery: the HTML report lists exactly the test images the probe gets wrong, each
    with a thumbnail on disk; their number against (1 - accuracy) x n of metrics/eval.json;
(2) leaks: 3 near-copies of train images planted in the test split (resized to 90 %,
    re-encoded at JPEG quality 70, a 5 % crop; and one with all three) are reported; the
    pairs reported on the unmodified set; the similarity of each copy and the highest one of
    a distinct photo (the margin audit.duplicate_threshold sits in);
(3) label errors: 5 train images moved to the other class's folder (their labels flipped):
    how many the audit lists among its likely label errors, and how many images it lists;
(4) cost: the audit stage and the report against the whole run (ingest to audit), codes
    already in the store (no forward pass in either).

    python bench/report.py [--work /tmp/tlflow-bench-report]

Extraction runs once (about 1-2 minutes on 2 cores); the variants copy its store, so only
the planted images take a forward pass.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"

from tlflow.flows.html_report import write_report  # noqa: E402
from tlflow.tasks import audit, evaluate, extract, ingest, train  # noqa: E402
from tlflow.tasks.lib.core.handoff.evaluate import EvalMetrics  # noqa: E402
from tlflow.tasks.lib.core.params import Params, params_under  # noqa: E402
from tlflow.tasks.lib.data.manifest import read_manifest  # noqa: E402


def _project(root: Path, source: Path, store_from: Path | None) -> Params:
    if store_from is not None and not (root / "features").exists():
        shutil.copytree(store_from / "features", root / "features")
    return params_under(root, ROOT / "params.yaml",
                        ingest={"source": "folder", "path": str(source)})


def _run(params: Params) -> dict[str, float]:
    """Every stage but finetune (off), then the report; seconds of each."""
    seconds = {}
    for name, stage in (("ingest", ingest), ("extract", extract), ("train", train),
                        ("evaluate", evaluate), ("audit", audit)):
        t0 = time.perf_counter()
        stage.run(params)
        seconds[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_report(params.base.paths, {})
    seconds["report"] = time.perf_counter() - t0
    return seconds


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _copy_source(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(HYMENOPTERA, dest)
    return dest


def plant(src: Path, train_files: list[Path]) -> dict[str, str]:
    """Near-copies of train images in the test split (hymenoptera's val/); copy -> original."""
    made = {}
    for n, (kind, f) in enumerate(zip(("resize90", "jpeg70", "crop5", "all3"), train_files,
                                      strict=True)):
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            if kind in ("resize90", "all3"):
                im = im.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC)
            if kind in ("crop5", "all3"):
                im = im.crop((0, 0, round(im.width * 0.95), round(im.height * 0.95)))
            dest = src / "val" / f.parent.name / f"planted_{n}_{kind}.jpg"
            im.save(dest, quality=70 if kind in ("jpeg70", "all3") else 95)
        made[f"val/{f.parent.name}/{dest.name}"] = f"train/{f.parent.name}/{f.name}"
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlflow-bench-report"))
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    # (1) and (4): the unmodified set
    clean = _project(work / "clean", HYMENOPTERA, None)
    t0 = time.perf_counter()
    first = _run(clean)
    print(f"first run (extract computes every code): {time.perf_counter() - t0:.1f} s")
    times = _run(clean)  # codes in the store: what a rerun costs
    paths = clean.base.paths
    probe = EvalMetrics.read(paths.eval_metrics).probe
    html = paths.report.read_text()
    gallery = html.split('id="gallery-probe"')[1].split("<h2")[0]
    listed = gallery.count('class="item"')
    thumbs = [t for t in gallery.split('<img src="')[1:]]
    on_disk = sum((paths.report.parent / t.split('"')[0]).is_file() for t in thumbs)
    clean_pairs = _json(paths.duplicates)["near_duplicates"]
    clean_issues = _json(paths.label_issues)
    rows = read_manifest(paths.manifest)
    train_rows = [r for r in rows if r.split == "train"]

    # (2) planted near-copies
    src = _copy_source(work / "planted_src")
    originals = [HYMENOPTERA / r.relpath for r in rng.sample(train_rows, 4)]
    made = plant(src, originals)
    planted = _project(work / "planted", src, work / "clean")
    _run(planted)
    pp = planted.base.paths
    pairs = _json(pp.duplicates)["near_duplicates"]["pairs"]
    found = {p["image"]["relpath"] for p in pairs if made.get(p["image"]["relpath"])
             == p["train_image"]["relpath"]}
    import numpy as np

    from tlflow.tasks.lib.core.handoff.extract import current_store
    from tlflow.tasks.lib.features.store import FeatureStore

    prow = read_manifest(pp.manifest)
    with FeatureStore(current_store(pp.features)) as st:
        keys = [r.sha256 for r in prow]
        x = dict(zip(keys, st.read("pooled", keys), strict=True))
    tr = [r for r in prow if r.split == "train"]
    t = np.stack([x[r.sha256] for r in tr])
    mean = t.mean(0)
    t = (t - mean) / np.linalg.norm(t - mean, axis=1, keepdims=True)
    sims = {}
    for r in prow:
        if r.split != "train":
            q = x[r.sha256] - mean
            sims[r.relpath] = float((t @ (q / np.linalg.norm(q))).max())
    distinct = max(s for k, s in sims.items() if k not in made)

    # (3) flipped labels
    src = _copy_source(work / "flipped_src")
    flipped = rng.sample(train_rows, 5)
    for r in flipped:
        other = "bees" if r.label == "ants" else "ants"
        shutil.move(str(src / r.relpath), str(src / "train" / other / Path(r.relpath).name))
    flip = _project(work / "flipped", src, work / "clean")
    _run(flip)
    issues = _json(flip.base.paths.label_issues)
    names = {Path(r.relpath).name for r in flipped}
    caught = [i["relpath"] for i in issues["images"] if Path(i["relpath"]).name in names]

    n, acc = probe.n, probe.accuracy
    added = times["audit"] + times["report"]
    whole = sum(times.values())
    copies = ", ".join(f"{k.split('_', 2)[2][:-4]} {sims[k]:.3f}" for k in made)
    print("\n== the report on hymenoptera (224 px) ==")
    print(f"(1) gallery: {listed} images listed; (1 - accuracy) x n = (1 - {acc:.4f}) x {n} "
          f"= {(1 - acc) * n:.2f}; thumbnails on disk {on_disk} of {len(thumbs)}")
    print(f"(2) planted near-copies found: {len(found)} of {len(made)} "
          f"({copies}); "
          f"highest similarity of a distinct photo {distinct:.3f}; threshold "
          f"{planted.audit.duplicate_threshold}; pairs on the unmodified set: "
          f"{clean_pairs['count']}")
    print(f"(3) flipped labels listed: {len(caught)} of 5; images listed in all: "
          f"{issues['count']} (unmodified set: {clean_issues['count']})")
    print(f"    flipped: {sorted(r.relpath for r in flipped)}; listed: "
          f"{[i['relpath'] for i in issues['images']]}")
    print(f"(4) rerun with codes cached: {', '.join(f'{k} {v:.2f} s' for k, v in times.items())}"
          f"; the audit + report add {added:.2f} s to {whole - added:.2f} s "
          f"(ratio {added / (whole - added):.2f}); first run {sum(first.values()):.1f} s")


if __name__ == "__main__":
    main()
