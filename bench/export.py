"""`tlflow export`, measured side by side in one run; ratios printed last.

In a trained project (run it from the project's folder, or name it):
(1) the export itself: wall time of tracing, translation, optimization and saving, the
    .onnx file's size (the probe served by predict: `--model`);
(2) agreement with predict: `tlflow predict`'s own code (tasks/predict.run, top-K = every
    class) against the graph in ONNX Runtime on the same image files (preprocessed as the
    sidecar says): classes that agree, the max probability difference;
(3) speed on this CPU, images/s at batch --batch on those images already preprocessed (the
    decoding is the same for both and left out): ONNX Runtime (CPU provider) against the
    same graph in torch, fp32, and against torch in predict's precision (bf16 autocast where
    the head's codes are bf16), --repeats passes each, interleaved, the best pass counting.

    python bench/export.py [PROJECT] --images ../shared/datasets/hymenoptera/val
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rate(step, x: np.ndarray, batch: int) -> float:
    """Images/s of one pass over x in batches."""
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        step(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project", nargs="?", type=Path, default=Path())
    ap.add_argument("--images", type=Path, required=True, help="an image or a folder")
    ap.add_argument("--model", default="probe", help="promoted | probe | finetuned")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    images = args.images.resolve()
    os.chdir(args.project)

    import json

    import torch

    from tlflow.tasks import export, predict
    from tlflow.tasks.lib.core.device import autocast
    from tlflow.tasks.lib.core.params import load_params
    from tlflow.tasks.lib.data.imagefiles import image_files
    from tlflow.tasks.lib.models.onnxexport import ort_session, read_batch, run_onnx
    from tlflow.tasks.lib.models.serving import load_served

    params = load_params()
    done = export.export_model(params, args.model)
    meta = json.loads(done.sidecar.read_text())
    files = image_files(images)
    with contextlib.redirect_stdout(io.StringIO()):
        preds = predict.run(params, images, k=len(meta["classes"]), model=args.model)
    x = read_batch(files, meta["preprocess"])
    session = ort_session(done.onnx)
    got = np.concatenate([run_onnx(session, x[i:i + args.batch])
                          for i in range(0, len(x), args.batch)])
    classes = meta["classes"]
    want = np.array([[dict(zip(p.labels, p.scores, strict=True))[c] for c in classes]
                     for p in preds])
    agree = sum(classes[i] == p.labels[0] for i, p in zip(got.argmax(1), preds, strict=True))

    # the same torch module the graph was exported from, built as export builds it
    served = load_served(params, args.model) or load_served(params, "probe")
    module = export.graph(served, params)[0]
    module = module.float().eval()
    precision = meta["predict_precision"]
    cpu = torch.device("cpu")

    def torch_step(batch: np.ndarray, precision: str = "fp32") -> None:
        with torch.inference_mode(), autocast(cpu, precision):
            module(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))

    module = module.to(memory_format=torch.channels_last)  # as predict runs it
    steps = {"onnxruntime fp32": lambda b: run_onnx(session, b),
             "torch fp32": torch_step}
    if precision != "fp32":
        steps[f"torch {precision} (predict's)"] = lambda b: torch_step(b, precision)
    for step in steps.values():  # warm-up
        step(x[:args.batch])
    rates = {name: 0.0 for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            rates[name] = max(rates[name], _rate(step, x, args.batch))

    print(f"model: {meta['model']['source']} ({meta['model']['artifact']}), "
          f"{meta['model'].get('backbone')}, input {meta['input']['shape']}, predict's "
          f"precision {precision}; torch {torch.get_num_threads()} threads, CPU cores "
          f"{os.cpu_count()}")
    print(f"export: {done.seconds:.1f} s, {done.size / 1e6:.1f} MB ({done.onnx})")
    print(f"agreement with tlflow predict on {len(files)} images: {agree}/{len(preds)} same "
          f"class, max |p_onnx - p_predict| {np.abs(got - want).max():.2e}")
    print(f"\nimages/s at batch {args.batch} (best of {args.repeats}, preprocessed):")
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:8.1f}")
    base = rates["onnxruntime fp32"]
    for name, rate in rates.items():
        if name != "onnxruntime fp32":
            print(f"ratio onnxruntime / {name}: {base / rate:.2f}x")


if __name__ == "__main__":
    main()
