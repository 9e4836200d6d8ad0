"""The advice: the 2x2 table from measured size and similarity (pure functions)."""

import numpy as np
import pytest

from tlflow.tasks.lib.core.handoff.train import SweepRow
from tlflow.tasks.lib.core.params import Advise
from tlflow.tasks.lib.data.manifest import Row
from tlflow.tasks.lib.probe import strategy


def _layers(pooled: float, earlier: float) -> list[SweepRow]:
    return [SweepRow(layer="pooled", dim=8, C=1.0, val_accuracy=pooled),
            SweepRow(layer="blocks.4", dim=4, C=1.0, val_accuracy=earlier)]


LAYERS = {"pooled_wins": _layers(0.95, 0.90), "earlier_wins": _layers(0.90, 0.97)}


def _rows(per_class: int) -> list[Row]:
    return [Row(f"{c}/{i}.png", f"{c}{i}", c, "train")
            for c in "ab" for i in range(per_class)]


def _spread(top10: float, images: int = 200) -> dict:
    return {"images": images, "top10_variance": top10, "imagenet_confidence": None}


@pytest.mark.parametrize(("per_class", "layers", "spread", "cell"), [
    (50, "pooled_wins", _spread(0.3), ("small", "similar", "probe")),
    (50, "earlier_wins", _spread(0.3), ("small", "dissimilar", "early_probe")),
    (50, "pooled_wins", _spread(0.9), ("small", "dissimilar", "early_probe")),
    (50, "pooled_wins", _spread(0.9, images=30), ("small", "similar", "probe")),  # too few
    (600, "pooled_wins", _spread(0.3), ("large", "similar", "finetune_top")),
    (600, "earlier_wins", None, ("large", "dissimilar", "finetune_all")),
])
def test_each_cell_of_the_table(per_class, layers, spread, cell):
    d = strategy.decide(_rows(per_class), LAYERS[layers], spread, Advise(strategy="auto"))
    assert (d.size, d.similarity, d.plan) == cell
    assert d.evidence["size"]["train_images_per_class_median"] == per_class
    assert strategy.PLANS[d.size, d.similarity] == d.plan


def test_a_forced_plan_is_kept_with_its_evidence():
    d = strategy.decide(_rows(50), LAYERS["pooled_wins"], _spread(0.3),
                      Advise(strategy="finetune_all"))
    assert (d.plan, d.forced, d.size, d.similarity) == ("finetune_all", True, "small", "similar")
    assert "forced" in strategy.table(d)


def test_imagenet_confidence_is_the_mean_top1_probability():
    w, b = np.eye(3), np.zeros(3)
    sure, flat = np.array([[50.0, 0, 0]]), np.zeros((1, 3))
    assert strategy.imagenet_confidence(sure, w, b) == pytest.approx(1.0)
    assert strategy.imagenet_confidence(flat, w, b) == pytest.approx(1 / 3)


def test_top10_variance_measures_how_the_variance_spreads():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(2000, 64))
    assert 10 / 64 < strategy.top10_variance(flat) < 0.25  # 10/64, plus sampling noise
    narrow = rng.normal(size=(2000, 3)) @ rng.normal(size=(3, 64))
    assert strategy.top10_variance(narrow) == pytest.approx(1.0)
