import numpy as np
import pytest

from tlflow.tasks.lib.probe import novelty


def test_threshold_flags_one_percent_of_held_out_data():
    rng = np.random.default_rng(0)
    train, val, test = (rng.normal(size=(n, 16)) for n in (1000, 500, 1000))
    d_val = novelty.kth_distance(train, val, 5)
    limit = novelty.threshold(d_val, 0.01)
    assert np.mean(novelty.is_novel(d_val, limit)) == 0.01
    # new data from the same distribution: about 1% (binomial: 10 expected of 1000)
    assert np.mean(novelty.is_novel(novelty.kth_distance(train, test, 5), limit)) <= 0.025


def test_far_points_are_novel_and_near_ones_are_not():
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(500, 8)), rng.normal(size=(200, 8))
    limit = novelty.threshold(novelty.kth_distance(train, val))
    far = rng.normal(size=(20, 8)) + 12.0
    assert novelty.is_novel(novelty.kth_distance(train, far), limit).all()
    near = rng.normal(size=(20, 8)) * 0.1  # where the training data is densest
    assert not novelty.is_novel(novelty.kth_distance(train, near), limit).any()


def test_leave_one_out_excludes_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0]])
    np.testing.assert_allclose(novelty.kth_distance(x, None, 1), [1.0, 1.0, 2.0])
    np.testing.assert_allclose(novelty.kth_distance(x, x, 1), [0.0, 0.0, 0.0])


def test_reference_rows_keep_all_or_a_seeded_sorted_subsample():
    np.testing.assert_array_equal(novelty.reference_rows(5, 10, 0), np.arange(5))
    rows = novelty.reference_rows(100, 10, 3)
    assert len(set(rows)) == 10 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, novelty.reference_rows(100, 10, 3))


def test_unit_rows_and_the_summary_line():
    np.testing.assert_allclose(np.linalg.norm(novelty.unit(np.array([[3.0, 4.0]])), axis=1), 1)
    assert novelty.summary(np.array([True] * 12 + [False] * 28)) == \
        "12 of 40 new images look unlike the training set"
    assert novelty.summary(np.array([False])) == "0 of 1 new image looks unlike the training set"


@pytest.mark.parametrize("chunk", [novelty.CHUNK, 1000])  # one block; blocks of 5 queries
def test_kth_distance_is_scikit_learns_nearest_neighbours(monkeypatch, chunk):
    """The numpy brute force finds the distances of sklearn's NearestNeighbors, queries and
    leave one out (duplicate rows included), on raw and on unit rows, block by block."""
    from sklearn.neighbors import NearestNeighbors

    monkeypatch.setattr(novelty, "CHUNK", chunk)
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(200, 24)).astype(np.float32)
    ref[10] = ref[11]  # a duplicate: its own copy is its nearest neighbour, at 0
    queries = rng.normal(size=(37, 24)).astype(np.float32)
    for r, q in ((ref, queries), (novelty.unit(ref), novelty.unit(queries))):
        for k in (1, 5):
            nn = NearestNeighbors(n_neighbors=k).fit(r)
            np.testing.assert_allclose(novelty.kth_distance(r, q, k),
                                       nn.kneighbors(q)[0][:, -1], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(novelty.kth_distance(r, None, k),
                                       nn.kneighbors()[0][:, -1], rtol=1e-5, atol=1e-6)
    assert novelty.kth_distance(ref, None, 1)[10] < 1e-6  # 0 up to float64 rounding
    with pytest.raises(ValueError, match="needs reference rows"):
        novelty.kth_distance(ref[:1], None)
