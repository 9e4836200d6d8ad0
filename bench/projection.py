"""Which 2-D projection the report's embedding map uses: PCA, t-SNE (scikit-learn) and UMAP
(umap-learn, when installed) on the codes of tlflow projects, timed side by side in one run.

    python bench/projection.py PROJECT [PROJECT ...] [--layer pooled]

Each PROJECT is a tlflow project that has run (its current store and manifest are read; no
forward pass). For each projection: seconds (UMAP twice: its first call in a process
compiles its numba code), and how readable the map is, as two numbers: the 5-nearest-
neighbour label accuracy in 2-D (5-fold cross-validated: do the classes form regions?) and
scikit-learn's trustworthiness (k=5: are the 2-D neighbours neighbours in the codes?). The
codes are standardized first (as the probe sees them). Ratios against PCA come last.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def _codes(project: Path, layer: str) -> tuple[np.ndarray, np.ndarray]:
    from tlflow.tasks.lib.core.handoff.extract import current_store
    from tlflow.tasks.lib.core.params import params_under
    from tlflow.tasks.lib.data.manifest import read_manifest
    from tlflow.tasks.lib.features.store import FeatureStore

    paths = params_under(project, project / "params.yaml").base.paths
    rows = read_manifest(paths.manifest)
    with FeatureStore(current_store(paths.features)) as store:
        keys = sorted({r.sha256 for r in rows} & set(store.keys()))
        x = np.asarray(store.read(layer, keys), dtype=np.float32)
    label = {r.sha256: r.label for r in rows}
    return x, np.array([label[k] for k in keys])


def _projections() -> dict[str, object]:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from tlflow.flows.embedding_map import tsne

    found: dict[str, object] = {
        "pca": lambda x: PCA(2, random_state=0).fit_transform(x),
        "tsne (1000 iter)": lambda x: TSNE(2, init="pca", perplexity=min(30, len(x) // 4),
                                           random_state=0).fit_transform(x),
        "tsne (the map's)": lambda x: tsne(x, 0),
    }
    try:
        import umap
    except ImportError:
        print("umap-learn not installed: UMAP left out (pip install umap-learn)")
        return found
    found["umap (first call)"] = lambda x: umap.UMAP(random_state=0).fit_transform(x)
    found["umap"] = lambda x: umap.UMAP(random_state=0).fit_transform(x)
    return found


def _readability(x: np.ndarray, xy: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from sklearn.manifold import trustworthiness
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = cross_val_score(KNeighborsClassifier(5), xy, y, cv=5).mean()
    return float(knn), float(trustworthiness(x, xy, n_neighbors=5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("projects", nargs="+", type=Path)
    ap.add_argument("--layer", default="pooled")
    args = ap.parse_args()
    from sklearn.preprocessing import StandardScaler

    methods = _projections()
    print(f"{os.cpu_count()} CPU cores; layer {args.layer}")
    for project in args.projects:
        x, y = _codes(project, args.layer)
        x = StandardScaler().fit_transform(x)
        print(f"\n{project}: {x.shape[0]} codes of {x.shape[1]} dims, {len(set(y))} classes")
        seconds = {}
        for name, fit in methods.items():
            t0 = time.perf_counter()
            xy = fit(x)
            seconds[name] = time.perf_counter() - t0
            knn, trust = _readability(x, xy, y)
            print(f"  {name:18s} {seconds[name]:6.2f} s   5-NN accuracy in 2-D {knn:.3f}   "
                  f"trustworthiness {trust:.3f}", flush=True)
        for name in seconds:
            if name != "pca":
                print(f"  {name} / pca: {seconds[name] / seconds['pca']:.0f}x the time")


if __name__ == "__main__":
    main()
