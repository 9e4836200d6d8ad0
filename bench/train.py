"""Training the linear probe, measured side by side in one run; ratios printed last.

(1) speed: on the same generated codes and the same C grid, a naive loop over C with
    scikit-learn's defaults (a fresh StandardScaler + LogisticRegression per C) against
    tlflow's sweep (normalization fitted once, warm starts along the C path); both print
    the C they select and its val accuracy.
(2) memory: the train stage with `classifier: sgd`, run as `tlflow stage train` in a
    generated project whose store holds --memory-rows codes; its peak resident memory.

    python bench/train.py [--speed-rows 50000] [--memory-rows 200000] [--dim 1280]

The codes are generated: non-negative like pooled CNN codes, correlated (a 64-dimensional
latent factor spread over all dimensions) and float16 in the store, with 10 overlapping
classes. They stand in for real codes of that size, which this machine has no images for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LATENT, CLASSES = 64, 10


class Codes:
    """A generator of labelled codes; every draw uses the same classes and factor loadings."""

    def __init__(self, dim: int, separation: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.loadings = rng.normal(size=(LATENT, dim)) / np.sqrt(LATENT)
        self.centers = rng.normal(size=(CLASSES, LATENT)) * separation

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(CLASSES, size=n)
        z = self.centers[y] + rng.normal(size=(n, LATENT))
        x = np.maximum(z @ self.loadings + 0.3 * rng.normal(size=(n, self.dim)), 0)
        return x.astype(np.float16), y.astype(str)


def bench_speed(codes: Codes, rows: int, grid: tuple[float, ...]) -> dict:
    """The naive loop over C and tlflow's sweep on the same train / val codes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlflow.tasks.lib.core.params import Train
    from tlflow.tasks.lib.probe.sweep import Split, best, sweep

    rng = np.random.default_rng(1)
    n_val = rows // 5
    x, y = codes.draw(rows, rng)
    x = x.astype(np.float32)  # as FeatureStore.read hands them to train
    xt, yt, xv, yv = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    print(f"speed: {len(yt)} train, {len(yv)} val codes of {codes.dim} dims, C grid {list(grid)}",
          flush=True)
    warnings.simplefilter("ignore", ConvergenceWarning)

    t0 = time.perf_counter()
    naive = []
    for C in grid:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C)).fit(xt, yt)
        naive.append({"C": C, "val_accuracy": model.score(xv, yv)})
        print(f"  naive C={C:<6g} val {naive[-1]['val_accuracy']:.4f} "
              f"({model[-1].n_iter_[0]} iterations)", flush=True)
    t_naive = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = sweep({"codes": Split(xt, yt, xv, yv)}, Train(C_grid=grid), seed=0)
    t_ours = time.perf_counter() - t0
    for r in ours:
        print(f"  ours  C={r.C:<6g} val {r.val_accuracy:.4f}", flush=True)
    return {"naive_s": t_naive, "ours_s": t_ours,
            "naive_best": max(naive, key=lambda r: r["val_accuracy"]),
            "ours_best": best(ours).model_dump()}


def write_project(dest: Path, codes: Codes, rows: int, epochs: int) -> Path:
    """A project whose store holds `rows` generated codes, ready for `tlflow stage train`."""
    from tlflow.tasks.lib.core.handoff.extract import Candidate, ExtractReport, Pointer
    from tlflow.tasks.lib.data.manifest import Row, write_manifest
    from tlflow.tasks.lib.features.store import FeatureStore

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(classifier="sgd", epochs=epochs)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    paths = {k: dest / v for k, v in raw["base"]["paths"].items()}
    store = paths["features"] / "bench.h5"
    rng = np.random.default_rng(2)
    manifest = []
    with FeatureStore.create(store, {"bench": "generated"}, {"pooled": codes.dim},
                             "float16") as s:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            x, y = codes.draw(n, rng)
            keys = [f"{i:064x}" for i in range(start, start + n)]
            s.append(keys, {"pooled": x})
            manifest += [Row(f"img/{k[-8:]}.png", k, label, "val" if i % 100 < 15 else "train")
                         for i, (k, label) in enumerate(zip(keys, y, strict=True), start)]
    write_manifest(manifest, paths["manifest"])
    generated = Candidate(backbone="bench/generated", weights="none", extractor_id=store.stem,
                          input_size=0, dims={"pooled": codes.dim})
    Pointer(extractor_id=store.stem, store=store.name, extractor={"bench": "generated"},
            candidates=(generated,)).write_to(paths["features"])
    ExtractReport(extractor_id=store.stem, images=rows,
                  bad_images=()).write(paths["extract_report"])
    return store


# `tlflow stage train`, then the process's own peak RSS: VmHWM belongs to the memory of the
# program after exec, whereas getrusage(RUSAGE_CHILDREN) would also count this bench's pages,
# which a forked child shares until it execs.
_STAGE_REPORTING_PEAK = """
import sys
from tlflow.flows.cli import main
rc = main(["stage", "train"])
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(rc)
"""


def bench_memory(codes: Codes, rows: int, epochs: int) -> dict:
    """Peak RSS of `tlflow stage train` (sgd) on a store of `rows` codes."""
    work = Path(tempfile.mkdtemp(prefix="tlflow-bench-train-"))
    try:
        t0 = time.perf_counter()
        store = write_project(work, codes, rows, epochs)
        print(f"memory: wrote {rows} x {codes.dim} float16 codes, "
              f"{store.stat().st_size / 2**20:.0f} MiB, in {time.perf_counter() - t0:.1f} s",
              flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _STAGE_REPORTING_PEAK], cwd=work,
                              text=True, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - t0
        print(proc.stdout, end="", flush=True)
        if proc.returncode:
            raise SystemExit(f"tlflow stage train failed with {proc.returncode}")
        peak = int(proc.stdout.rsplit("VmHWM:", 1)[1].split()[0]) * 1024  # kB
        from tlflow.tasks.lib.core.handoff.train import ProbeReport

        report = yaml.safe_load((work / "params.yaml").read_text())["base"]["paths"]["probe_report"]
        best = ProbeReport.read(work / report).best.model_dump()
        return {"peak_bytes": peak, "seconds": seconds, "best": best,
                "store_bytes": store.stat().st_size}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-rows", type=int, default=50_000)
    ap.add_argument("--memory-rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--epochs", type=int, default=3, help="sgd passes in the memory bench")
    ap.add_argument("--separation", type=float, default=0.3, help="class separation")
    ap.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    codes = Codes(args.dim, args.separation)
    print(f"threads: {os.cpu_count()} cores", flush=True)

    speed = bench_speed(codes, args.speed_rows, tuple(args.grid))
    memory = None if args.skip_memory else bench_memory(codes, args.memory_rows, args.epochs)

    nb, ob = speed["naive_best"], speed["ours_best"]
    print("\nresults")
    print(f"  naive loop over C   {speed['naive_s']:7.1f} s  selects C={nb['C']:g}, "
          f"val {nb['val_accuracy']:.4f}")
    print(f"  tlflow sweep        {speed['ours_s']:7.1f} s  selects C={ob['C']:g}, "
          f"val {ob['val_accuracy']:.4f}")
    print(f"  ratio ours / naive  {speed['ours_s'] / speed['naive_s']:7.2f}   (goal <= 0.5), "
          f"val accuracy difference {ob['val_accuracy'] - nb['val_accuracy']:+.4f}")
    if memory:
        b = memory["best"]
        print(f"  sgd stage on {args.memory_rows} x {args.dim} codes "
              f"({memory['store_bytes'] / 2**30:.2f} GiB float16 store): peak RSS "
              f"{memory['peak_bytes'] / 2**30:.2f} GiB (goal < 1.5 GB = 1.40 GiB), "
              f"{memory['seconds']:.0f} s, C={b['C']:g}, val {b['val_accuracy']:.4f}")


if __name__ == "__main__":
    main()
