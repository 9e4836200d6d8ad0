"""The report's embedding map: the test images' codes of the chosen layer projected to 2-D
by t-SNE, one point per image coloured by its true label, the probe's wrong answers ringed,
and on hover the image's thumbnail, file name, label and prediction (plain SVG: `<title>`
and a CSS :hover, no script).

Why t-SNE (scikit-learn's): measured by bench/projection.py on 2 CPU cores (pooled codes,
standardized), it separates the classes as well as UMAP (5-NN label accuracy in 2-D on the
1,797 digits: t-SNE 0.861, UMAP 0.854, PCA 0.381; trustworthiness 0.912, 0.852, 0.730) in
the same time as UMAP's first call in a process (15.4 s against 15.2 s; UMAP's numba code
compiles on every first call, and a report is one process), and faster on the 398
hymenoptera photos (3.0 s against 11.7 s); umap-learn would add numba and llvmlite for
nothing. The projection is kept beside the page (map/<hash>.json) while the codes, layer and
seed are the same, so a `tlflow run` that changes no result does not compute it again.

At most MAX_POINTS test images are drawn: beyond, every wrongly answered one while they fill
at most half of them (else a random half), then a random sample of the rest (seed SEED: the
same test set gives the same map); the page says how many of how many.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from tlflow.tasks.lib.core.files import write_text
from tlflow.tasks.lib.core.handoff.evaluate import ImagePrediction

SEED = 0  # the sample's and t-SNE's
MAX_POINTS = 1000  # t-SNE on 1,000 codes: a few seconds on 2 cores, once per new result
MIN_POINTS = 5  # fewer test images: no map
TSNE_ITER = 500
MAP = "map"  # beside the page: map/<hash>.json, the projection while its inputs are the same
SIDE = 560  # the map's side in SVG units (pixels at 100 %)
MARGIN = 12
# Tableau's 10 colours (matplotlib's tab10), then hues around the circle
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
_CACHED = re.compile(r"^[0-9a-f]{16}\.json$")


def subsample(preds: list[ImagePrediction], limit: int, seed: int) -> list[ImagePrediction]:
    """At most `limit` of them, in their order: every wrong one while they fill at most half
    the limit (beyond, a seeded sample of them: the map keeps the data's shape), then a
    seeded uniform sample of the right ones for the rest."""
    if len(preds) <= limit:
        return preds
    wrong = [i for i, p in enumerate(preds) if not p.correct]
    right = [i for i, p in enumerate(preds) if p.correct]
    n_wrong = min(len(wrong), max(limit // 2, limit - len(right)))
    rng = np.random.default_rng(seed)
    keep = set(wrong) if n_wrong == len(wrong) else \
        set(rng.choice(wrong, n_wrong, replace=False).tolist())
    keep |= set(rng.choice(right, limit - n_wrong, replace=False).tolist())
    return [p for i, p in enumerate(preds) if i in keep]


def tsne(codes: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) t-SNE coordinates of standardized codes (scikit-learn: PCA initialisation,
    perplexity 30, or n/4 for few points; 500 iterations, which on the digits' test codes
    take a tenth of the default 1,000's time for the same 5-NN accuracy in 2-D)."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = StandardScaler().fit_transform(codes.astype(np.float32))
    perplexity = float(min(30, max(1, (len(x) - 1) // 4)))
    # one OpenMP thread: on a busy machine (2 cores shared) the Barnes-Hut gradient's threads
    # wait on each other, 0.7 s against 4.8-6.4 s on the digits' 286 test codes
    with threadpool_limits(1, user_api="openmp"):
        return TSNE(2, init="pca", perplexity=perplexity, max_iter=TSNE_ITER,
                    random_state=seed).fit_transform(x)


def projection(store: Path, layer: str, keys: list[str], seed: int, folder: Path) -> np.ndarray:
    """tsne() of the store's codes of `keys` on `layer`, read from `folder` when the same
    store, layer, keys, seed and scikit-learn computed it before (the folder keeps only the
    last one)."""
    from tlflow.tasks.lib.features.store import FeatureStore

    ident = json.dumps([store.name, layer, keys, seed, version("scikit-learn"), TSNE_ITER])
    path = folder / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return np.asarray(json.loads(path.read_text()), dtype=np.float64)
    with FeatureStore(store) as fs:
        xy = tsne(np.asarray(fs.read(layer, keys)), seed).astype(np.float64)
    write_text(path, json.dumps(np.round(xy, 4).tolist()))
    for old in folder.iterdir():
        if _CACHED.match(old.name) and old != path:
            old.unlink()
    return xy


def _scaled(xy: np.ndarray) -> np.ndarray:
    """Coordinates in [MARGIN, SIDE - MARGIN], the aspect ratio kept, centred, y up."""
    lo, span = xy.min(axis=0), np.ptp(xy, axis=0)
    scale = (SIDE - 2 * MARGIN) / max(float(span.max()), 1e-9)
    out = (xy - lo) * scale + MARGIN + (SIDE - 2 * MARGIN - span * scale) / 2
    out[:, 1] = SIDE - out[:, 1]
    return np.round(out, 1)


def colours(classes: list[str]) -> dict[str, str]:
    """One colour per class: tab10, then evenly spaced hues."""
    n = len(classes)
    return {c: PALETTE[i] if n <= len(PALETTE) else f"hsl({round(360 * i / n)}, 65%, 48%)"
            for i, c in enumerate(classes)}


def embedding_map(preds: list[ImagePrediction], store: Path, layer: str, folder: Path,
                  thumb) -> dict[str, Any] | None:
    """The map's data for the template: points (x, y in SVG units, relpath, label,
    prediction, right or not, thumbnail), the classes' colours, and how many of how many
    test images it shows; None with fewer than MIN_POINTS. `preds`: one model's per-image
    predictions on the test split; `thumb`: html_report.Thumbnails."""
    if len(preds) < MIN_POINTS:
        return None
    shown = subsample(preds, MAX_POINTS, SEED)
    xy = _scaled(projection(store, layer, [p.sha256 for p in shown], SEED, folder))
    palette = colours(sorted({p.label for p in preds}))
    order = sorted(range(len(shown)), key=lambda i: shown[i].correct, reverse=True)
    points = [{"x": float(xy[i, 0]), "y": float(xy[i, 1]), "relpath": shown[i].relpath,
               "label": shown[i].label, "pred": shown[i].top[0] if shown[i].top else "",
               "correct": shown[i].correct, "colour": palette[shown[i].label],
               "thumb": thumb(shown[i].relpath, shown[i].sha256)}
              for i in order]  # the wrong ones last: drawn on top
    return {"points": points, "colours": palette, "shown": len(shown), "total": len(preds),
            "layer": layer, "side": SIDE, "limit": MAX_POINTS}
