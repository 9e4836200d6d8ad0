"""The advice: place the data set in the notes' 2x2 table from measurements, and name the plan.

                 similar to ImageNet            not similar
    small        probe on the pooled codes      probe on an earlier layer (early_probe)
    large        fine-tune the last blocks,     fine-tune everything (finetune_all)
                 then all while val improves
                 (finetune_top)

Size: images per class in the train split (the median class) against advise.large_per_class.
Similarity, two signals, both from the cached codes (no forward pass):
- supervised: the best probe's val accuracy on an earlier layer against the best on the
  pooled codes (from the train stage's sweep); late codes hold the original classes'
  features, so when an earlier layer wins by more than advise.layer_margin, the data set is
  unlike the pretraining data;
- label-free: how the pooled codes' variance spreads. The late features detect ImageNet's
  parts and objects; images unlike ImageNet's excite few of them, and the codes' variance
  gathers in a few directions. The share of variance in the top 10 principal components
  above advise.max_top10_variance places the data set dissimilar (measured on 2 cores:
  hymenoptera 0.36, digits at 64 px 0.61, sine-grating textures 0.91). It needs
  advise.min_images_for_spread images; below that it is reported but not used.
Either signal placing it dissimilar places it dissimilar. `tlflow advise` also reports the
ImageNet head's mean top-1 probability, but it is not used: it is no guide (digits at 64 px
get 0.82, more than hymenoptera's 0.71; gratings get 0.06 at 224 px but 0.69 at 64 px).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.train import Strategy, SweepRow
from tlflow.tasks.lib.core.params import Advise
from tlflow.tasks.lib.data.manifest import Row
from tlflow.tasks.lib.features.store import FeatureStore

POOLED = "pooled"
PLANS = {
    ("small", "similar"): "probe",
    ("small", "dissimilar"): "early_probe",
    ("large", "similar"): "finetune_top",
    ("large", "dissimilar"): "finetune_all",
}


def size_of(rows: list[Row], cfg: Advise) -> tuple[str, dict[str, Any]]:
    """small | large from the train split's images per class (the median class)."""
    counts = Counter(r.label for r in rows if r.split == "train")
    per_class = float(median(counts.values())) if counts else 0.0
    return ("large" if per_class >= cfg.large_per_class else "small"), {
        "train_images": sum(counts.values()), "classes": len(counts),
        "train_images_per_class_median": per_class,
        "train_images_per_class_min": min(counts.values(), default=0),
        "large_per_class": cfg.large_per_class,
    }


def layer_gap(layers: Sequence[SweepRow]) -> dict[str, Any] | None:
    """Best val accuracy on an earlier layer minus the one on pooled codes (None without both)."""
    pooled = [r for r in layers if r.layer == POOLED]
    earlier = [r for r in layers if r.layer != POOLED]
    if not pooled or not earlier:
        return None
    best = max(earlier, key=lambda r: r.val_accuracy)
    return {"pooled_val_accuracy": pooled[0].val_accuracy, "earlier_layer": best.layer,
            "earlier_val_accuracy": best.val_accuracy,
            "gap": best.val_accuracy - pooled[0].val_accuracy}


def imagenet_confidence(pooled: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """Mean top-1 softmax probability of the ImageNet classifier on pooled codes."""
    z = pooled @ weight.T + bias
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return float((z.max(axis=1) / z.sum(axis=1)).mean())


def top10_variance(codes: np.ndarray) -> float:
    """Share of the codes' variance in their 10 leading principal components."""
    x = codes - codes.mean(axis=0)
    var = np.linalg.svd(x.astype(np.float64), compute_uv=False) ** 2
    return float(var[:10].sum() / max(var.sum(), 1e-12))


def similarity_of(gap: dict | None, spread: dict | None,
                  cfg: Advise) -> tuple[str, dict[str, Any]]:
    """dissimilar when either signal says so; similar otherwise."""
    reasons = []
    if gap is not None and gap["gap"] > cfg.layer_margin:
        reasons.append(f"{gap['earlier_layer']} beats pooled by {gap['gap']:.3f} on val")
    usable_spread = spread is not None and spread["images"] >= cfg.min_images_for_spread
    if usable_spread and spread["top10_variance"] > cfg.max_top10_variance:
        reasons.append(f"the top 10 components hold {spread['top10_variance']:.2f} of the "
                       f"pooled codes' variance (> {cfg.max_top10_variance})")
    evidence = {"layers": gap, "spread": spread, "spread_used": usable_spread,
                "layer_margin": cfg.layer_margin,
                "max_top10_variance": cfg.max_top10_variance,
                "reasons": reasons or ["no signal says dissimilar"]}
    return ("dissimilar" if reasons else "similar"), evidence


def decide(rows: list[Row], layers: Sequence[SweepRow], spread: dict | None,
           cfg: Advise) -> Strategy:
    """The placement, the plan, and the numbers behind them; a forced plan is kept as given.
    Fine-tuning carries the plan out unless advise.strategy is manual."""
    size, size_ev = size_of(rows, cfg)
    similarity, sim_ev = similarity_of(layer_gap(layers), spread, cfg)
    forced = cfg.strategy not in ("auto", "manual")
    return Strategy(size=size, similarity=similarity,
                    plan=cfg.strategy if forced else PLANS[size, similarity], forced=forced,
                    evidence={"size": size_ev, "similarity": sim_ev},
                    carried_out=cfg.strategy != "manual")


# ---------------------------------------------------------------- reading the project


SPREAD_SAMPLE = 4096  # images the spread is measured on, at most (a seeded sample)


Classifier = tuple[np.ndarray, np.ndarray]  # the backbone's ImageNet weight (K, D), bias (K,)


def measure(store_path: Path, rows: list[Row], layers: Sequence[SweepRow], cfg: Advise, seed: int,
            classifier: Classifier | None = None) -> Strategy:
    """Decide from the manifest rows, the sweep's per-layer table and the store's pooled codes
    (a seeded sample of at most SPREAD_SAMPLE); with the backbone's ImageNet `classifier`,
    also report its mean top-1 probability."""
    spread = None
    keys = sorted({r.sha256 for r in rows if r.split in ("train", "val")})
    if len(keys) > SPREAD_SAMPLE:
        rng = np.random.default_rng(seed)
        keys = sorted(rng.choice(keys, SPREAD_SAMPLE, replace=False))
    with FeatureStore(store_path) as store:
        if POOLED in store.layers and keys:
            codes = store.read(POOLED, keys)
            spread = {"images": len(keys), "top10_variance": top10_variance(codes),
                      "imagenet_confidence": None}
            if classifier is not None and classifier[0].shape[1] == codes.shape[1]:
                spread["imagenet_confidence"] = imagenet_confidence(codes, *classifier)
    return decide(rows, layers, spread, cfg)


def layer_for(decision: Strategy, layers: Sequence[SweepRow]) -> str | None:
    """The probe's layer under the plan: pooled, the best earlier one, or the sweep's best.
    A measured plan (auto) whose layer was not extracted takes the sweep's best and says so;
    a forced one stops with an error."""
    if decision.plan == "probe":
        layer = POOLED if any(r.layer == POOLED for r in layers) else None
        needs = "pooled codes; add pooled to extract.layers"
    elif decision.plan == "early_probe":
        earlier = [r for r in layers if r.layer != POOLED]
        layer = max(earlier, key=lambda r: r.val_accuracy).layer if earlier else None
        needs = "an earlier layer in extract.layers (e.g. blocks.4)"
    else:
        return None  # fine-tuning plans: the probe is the head's start; the sweep's best serves
    if layer is None:
        if decision.forced:
            raise TlflowError(f"advise.strategy: the plan '{decision.plan}' needs {needs}")
        print(f"train: plan {decision.plan} needs {needs}; not extracted, so the probe takes "
              "the sweep's best layer", flush=True)
    return layer


def table(decision: Strategy) -> str:
    """The 2x2 table as markdown, the data set's cell marked, then the numbers behind it."""
    def cell(size: str, sim: str) -> str:
        plan = PLANS[size, sim]
        here = decision.size == size and decision.similarity == sim
        return f"**{plan} ← this data set**" if here else plan

    ev = decision.evidence
    s, m = ev["size"], ev["similarity"]
    lines = [
        "| | similar to ImageNet | not similar |", "|---|---|---|",
        f"| **small** | {cell('small', 'similar')} | {cell('small', 'dissimilar')} |",
        f"| **large** | {cell('large', 'similar')} | {cell('large', 'dissimilar')} |", "",
        f"- size: **{decision.size}**: median {s['train_images_per_class_median']:g} train "
        f"images per class ({s['train_images']} in {s['classes']} classes; large from "
        f"{s['large_per_class']})",
    ]
    gap = m["layers"]
    if gap:
        lines.append(f"- probes on val: pooled {gap['pooled_val_accuracy']:.4f}, "
                     f"{gap['earlier_layer']} {gap['earlier_val_accuracy']:.4f} "
                     f"(gap {gap['gap']:+.4f}; dissimilar above {m['layer_margin']})")
    spread = m["spread"]
    if spread:
        used = "" if m["spread_used"] else ", too few images: not used"
        lines.append(f"- pooled codes: the top 10 components hold {spread['top10_variance']:.2f} "
                     f"of the variance over {spread['images']} images (dissimilar above "
                     f"{m['max_top10_variance']}{used})")
        if spread["imagenet_confidence"] is not None:
            lines.append(f"- ImageNet head's mean top-1 probability: "
                         f"{spread['imagenet_confidence']:.3f} (reported, not used)")
    lines.append(f"- similarity: **{decision.similarity}**: {'; '.join(m['reasons'])}")
    forced = " (forced by advise.strategy)" if decision.forced else ""
    lines.append(f"- plan: **{decision.plan}**{forced}")
    return "\n".join(lines)
