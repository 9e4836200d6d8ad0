"""The data checks on codes: near-copies across splits, one file under two labels, likely
label errors (confident learning on out-of-fold probabilities), class balance."""

import numpy as np

from tlflow.tasks.lib.assess.audit import (
    ProbeSetting,
    balance,
    label_conflicts,
    label_issues,
    near_duplicates,
)
from tlflow.tasks.lib.data.manifest import Row

PROBE = ProbeSetting("pooled", (0.1, 1.0), "standardize", 1000, None)


def _codes(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Non-negative codes with a large shared component, as pooled CNN codes have."""
    rng = np.random.default_rng(seed)
    return np.abs(5.0 + rng.normal(size=(n, dim)))


def test_a_near_copy_in_test_is_found_and_distinct_images_are_not():
    x = _codes(30)
    rows = [Row(f"train/{i}.png", f"t{i}", "a", "train") for i in range(20)]
    rows += [Row(f"test/{i}.png", f"q{i}", "a", "test") for i in range(10)]
    codes = {r.sha256: x[i] for i, r in enumerate(rows)}
    codes["q3"] = codes["t7"] + np.random.default_rng(1).normal(0, 0.1, 64)  # a near-copy
    rows.append(Row("val/same.png", "t2", "a", "val"))  # the very same file in val
    out = near_duplicates(codes, rows, threshold=0.8, max_listed=10)
    found = {(p["image"]["relpath"], p["train_image"]["relpath"], p["exact"])
             for p in out["pairs"]}
    assert found == {("test/3.png", "train/7.png", False), ("val/same.png", "train/2.png", True)}
    assert out["count"] == 2 and out["pairs"][0]["exact"]  # most similar first
    capped = near_duplicates(codes, rows, threshold=0.8, max_listed=1)  # the count stays whole
    assert capped["count"] == 2 and len(capped["pairs"]) == 1


def test_one_file_under_two_labels_is_a_conflict():
    rows = [Row("a/x.png", "h1", "a", "train"), Row("b/x.png", "h1", "b", "test"),
            Row("a/y.png", "h2", "a", "train"), Row("a/y2.png", "h2", "a", "val")]
    out = label_conflicts(rows, 10)
    assert out["count"] == 1
    assert out["groups"][0]["labels"] == ["a", "b"]
    assert [i["relpath"] for i in out["groups"][0]["images"]] == ["a/x.png", "b/x.png"]


def test_flipped_labels_are_likely_label_errors():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 32)) * 4
    y = np.repeat(np.array(["a", "b", "c"]), 40)
    x = centres[np.searchsorted(["a", "b", "c"], y)] + rng.normal(size=(120, 32))
    given = y.copy()
    flipped = [5, 50, 90]
    given[flipped] = ["b", "c", "a"]
    rows = [Row(f"{g}/{i}.png", f"h{i}", g, "train") for i, g in enumerate(given)]
    out = label_issues(rows, x, PROBE, folds=5, seed=0, max_listed=50)
    listed = {img["relpath"]: img for img in out["images"]}
    assert {rows[i].relpath for i in flipped} <= set(listed)
    assert out["count"] <= 6, out["images"]
    assert listed["b/5.png"]["suggested"] == "a" and listed["b/5.png"]["p_label"] < 0.5


def test_too_few_images_skip_the_label_check():
    rows = [Row("a/0.png", "h0", "a", "train"), Row("b/1.png", "h1", "b", "train")]
    out = label_issues(rows, np.eye(2), PROBE, folds=5, seed=0, max_listed=5)
    assert out["count"] == 0 and "too few images" in out["skipped"]


def test_balance_per_split():
    rows = [Row(f"{c}/{i}", f"{c}{i}", c, s) for c, s, n in
            (("a", "train", 6), ("b", "train", 2), ("a", "test", 1)) for i in range(n)]
    out = balance(rows)
    assert out["splits"]["train"] == {"a": 6, "b": 2}
    assert out["imbalance"] == {"train": 3.0, "val": None, "test": None}
    assert out["missing"] == {"train": [], "val": [], "test": ["b"]}
