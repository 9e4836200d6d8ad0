"""Start-up of one prediction against the imports and forward pass it cannot avoid, side by
side in one run (issue 27: `tlflow predict one.jpg` within 1.5x of `python -c "import torch,
timm"` plus the forward pass).

Three commands, each a fresh process, timed in turn (a, b, c, a, b, c, ...: the machine's
noise falls on all three alike), N rounds after one untimed warm-up round:

  a  import      python -c "import torch, timm"
  b  baseline    import torch and timm, build the head's backbone with its packaged weights
                 (tlflow's create_backbone, the backbone and input size the head's sidecar
                 names) and run one forward pass on the image
  c  predict     tlflow predict IMAGE, in the project

It prints each one's median wall time, the ratios c/a and c/b, and which of prefect, dvc,
sklearn, scipy, pandas, gto the predict process imported (one more run of c through a small
wrapper that writes the top-level names of sys.modules at exit).

    python bench/predict_startup.py PROJECT [--image one.jpg] [--rounds 3]

PROJECT is a trained project (`tlflow init proj --commit && cd proj && tlflow run`). Without
--image, the first image of the project's snapshot is rotated 5 degrees and saved as a JPEG
(bytes the feature store has not seen, so predict computes its code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WATCHED = ("prefect", "dvc", "sklearn", "scipy", "pandas", "gto")

IMPORT = "import torch, timm"

BASELINE = """
import json, sys
import torch, timm
from PIL import Image
from tlflow.tasks.lib.features.backbones import create_backbone
meta = json.load(open(sys.argv[1]))
bb = create_backbone(meta["backbone"], meta.get("weights", "packaged"), meta.get("input_size"))
x = bb.transform()(Image.open(sys.argv[2]).convert("RGB")).unsqueeze(0)
with torch.inference_mode():
    bb.model(x)
"""

MODULES = """
import atexit, json, sys
listing = sys.argv[1]
def dump():
    with open(listing, "w") as f:
        json.dump(sorted({m.partition(".")[0] for m in sys.modules}), f)
atexit.register(dump)
sys.argv = ["tlflow", "predict", sys.argv[2]]
from tlflow.flows.cli import console
console()
"""


def project_paths(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())["base"]["paths"]


def new_jpeg(project: Path, dest: Path) -> Path:
    """The project's first snapshot image, rotated 5 degrees, as a JPEG."""
    from PIL import Image

    images = project / project_paths(project)["images"]
    src = next(p for p in sorted(images.rglob("*"))
               if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    out = dest / "one.jpg"
    Image.open(src).convert("RGB").rotate(5, fillcolor=(0, 0, 0)).save(out, quality=90)
    return out


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])}... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    project = args.project.resolve()
    tlflow = shutil.which("tlflow", path=str(Path(sys.executable).parent)) or "tlflow"
    with tempfile.TemporaryDirectory() as tmp:
        image = (args.image or new_jpeg(project, Path(tmp))).resolve()
        head_json = project / f"{project_paths(project)['head']}.json"
        commands = {
            "a import": [sys.executable, "-c", IMPORT],
            "b baseline": [sys.executable, "-c", BASELINE, str(head_json), str(image)],
            "c predict": [tlflow, "predict", str(image)],
        }
        walls: dict[str, list[float]] = {k: [] for k in commands}
        for r in range(args.rounds + 1):  # round 0 warms the file cache, untimed
            for key, cmd in commands.items():
                wall = timed(cmd, project)
                if r:
                    walls[key].append(wall)
        listing = Path(tmp) / "modules.json"
        timed([sys.executable, "-c", MODULES, str(listing), str(image)], project)
        loaded = set(json.loads(listing.read_text()))
    print(f"image {image}, project {project}, {args.rounds} rounds (a, b, c in turn)")
    med = {k: statistics.median(v) for k, v in walls.items()}
    for key, values in walls.items():
        print(f"  {key:<11} median {med[key]:5.2f} s   ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"  c/a {med['c predict'] / med['a import']:.2f}   "
          f"c/b {med['c predict'] / med['b baseline']:.2f}")
    print("  predict imported: " + ", ".join(
        f"{m} {'yes' if m in loaded else 'no'}" for m in WATCHED))


if __name__ == "__main__":
    main()
