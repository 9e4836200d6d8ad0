"""DDP on CPU processes against one process, on the same fine-tuning, side by side in one run.

One project (digits at 64 px, bench/finetune.py's digits scenario: the whole network, lr
1e-3, body x 0.3) is ingested, extracted and trained once; then the finetune stage runs
with 1 process (batch 32), N processes under torchrun (gloo; batch 32 / N each, so the
effective batch and the learning rate are the same), and 1 process again (the machine's other
load may change during the run: the two one-process runs bracket it, and the ratio takes
their mean), each followed by evaluate. Printed: mean epoch seconds, the stage's seconds
(torchrun's start included), best epoch, val and test accuracy, then the ratios.

    python bench/ddp.py [--nproc 2] [--epochs 10] [--seed 0]

Threads: one process uses torch's default (all cores); each of N ranks gets cores / N
(tasks/lib/scale/torchrun.py sets OMP_NUM_THREADS), so both use the whole machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _digits_scenario() -> dict[str, dict]:
    """bench/finetune.py's digits settings (said once, there)."""
    spec = importlib.util.spec_from_file_location("bench_finetune", ROOT / "bench/finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCENARIOS["digits"]


def _finetune(params, label: str) -> dict:
    """The finetune stage then evaluate; the stage's lines are echoed and parsed."""
    from tlflow.tasks import evaluate, finetune
    from tlflow.tasks.lib.finetune.network import read_meta

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        finetune.run(params)
    seconds = time.perf_counter() - t0
    text = out.getvalue()
    print(text, end="", flush=True)
    epochs = [float(m[1]) for m in re.finditer(r"finetune: epoch \d+/\d+ .*?, ([\d.]+) s", text)]
    metrics = evaluate.run(params)
    meta = read_meta(params.base.paths.finetuned)
    return {"label": label, "stage": seconds, "epochs": epochs, "meta": meta,
            "test": metrics["finetune"]["accuracy"], "probe": metrics["probe"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32, help="effective batch of both runs")
    args = ap.parse_args()
    import os

    import torch

    from tlflow.tasks import extract, ingest, train
    from tlflow.tasks.lib.core.params import params_under

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"threads in one process; {args.nproc} processes of {args.batch // args.nproc} "
          f"against 1 of {args.batch}", flush=True)
    sections = {k: dict(v) for k, v in _digits_scenario().items()}
    sections["base"] = {"seed": args.seed}
    sections["finetune"].update(epochs=args.epochs, patience=args.epochs)
    work = Path(tempfile.mkdtemp(prefix="tlflow-bench-ddp-"))
    try:
        base = params_under(work, ROOT / "params.yaml", **sections)
        for stage in (ingest, extract, train):
            stage.run(base)
        runs = []
        for nproc in (1, args.nproc, 1):
            ft = {**sections["finetune"], "nproc_per_node": nproc,
                  "batch_size": args.batch // nproc}
            params = params_under(work, ROOT / "params.yaml", **{**sections, "finetune": ft})
            print(f"\n== {nproc} process(es), batch {args.batch // nproc} each", flush=True)
            runs.append(_finetune(params, f"{nproc} x batch {args.batch // nproc}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ndigits, 64 px, all layers, {args.epochs} epochs, seed {args.seed}, effective "
          f"batch {args.batch} (probe test {runs[0]['probe']:.4f})")
    print("| processes x batch | mean epoch s | finetune stage s | best epoch | val acc | "
          "test acc |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        m = r["meta"]
        print(f"| {r['label']} | {statistics.mean(r['epochs']):.1f} | {r['stage']:.0f} | "
              f"{m.best_epoch} of {m.epochs_run} | {m.val_accuracy:.4f} | "
              f"{r['test']:.4f} |")
    one, many, again = runs
    single = statistics.mean(one["epochs"] + again["epochs"])
    print(f"ratio mean epoch time {args.nproc} processes / 1 (both one-process runs): "
          f"{statistics.mean(many['epochs']) / single:.2f}")
    print(f"test accuracy {args.nproc} processes - 1: "
          f"{100 * (many['test'] - one['test']):+.2f} points (goal: within 2)")


if __name__ == "__main__":
    main()
