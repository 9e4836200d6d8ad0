"""A run's new images judged by the probe that served before it (flows/drift.py), on a tiny
colour project run in this process: a batch of unseen-looking images (yellow, noise) and a
few of a known class, added after the first run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS, colour_images, make_params, write_image
from tlflow.flows import drift
from tlflow.flows.artifacts import Snapshot, summary_markdown
from tlflow.flows.html_report import Thumbnails, new_images_view
from tlflow.tasks import extract, ingest, train
from tlflow.tasks.lib.core.handoff import NewImages
from tlflow.tasks.lib.probe import trust
from tlflow.tasks.lib.probe.head import LinearHead

NOVEL, KNOWN = 10, 4  # 4 yellow and 6 noise images; 4 more green ones


def _add_batch(src: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):  # uniform noise, under a known class's folder
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            src / "red" / f"noise{i}.png")
    for i in range(4):  # a colour never seen, labelled blue
        write_image(src / "blue" / f"yellow{i}.png", (230, 220, 30), seed=6000 + i)
    for i in range(KNOWN):
        write_image(src / "green" / f"new{i}.png", COLOURS["green"], seed=5000 + i)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """The first run's stages (ingest, extract, train), a batch added, the second run's
    ingest and extract, and what the flow judges between extract and train. blocks.1 (24
    channels): pooled codes of 24 px noise images at 32 px are all about as far apart
    (22 train codes in 1,280 dims), an early layer's colour and texture are not."""
    base = tmp_path_factory.mktemp("drift")
    src = colour_images(base / "src")
    params = make_params(base, ingest={"source": "folder", "path": str(src)},
                         extract={"layers": ["blocks.1"], "image_size": 32,
                                  "precision": "fp32"})
    paths = params.base.paths
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        ingest.run(params)
        assert drift.to_judge(paths, frozenset()) == []  # a first run: nothing to judge
        extract.run(params)
        train.run(params)
        before = Snapshot.take(paths)
        assert drift.to_judge(paths, before.images) == []  # nothing new
        _add_batch(src)
        ingest.run(params)
        extract.run(params)
        new = drift.to_judge(paths, before.images)
        report = drift.record(paths, new)
        yield params, before, new, report


def test_the_summary_counts_the_novel_new_images(runs):
    params, before, new, report = runs
    assert len(new) == NOVEL + KNOWN
    assert (report.new, report.novel) == (NOVEL + KNOWN, NOVEL), report.images
    flagged = {Path(g.relpath).name for g in report.images}
    assert not any(name.startswith("new") for name in flagged)  # the known green ones
    assert [g.distance for g in report.images] == sorted(
        (g.distance for g in report.images), reverse=True)  # farthest first
    assert min(g.distance for g in report.images) > report.threshold
    paths = params.base.paths
    assert NewImages.read(paths.new_images) == report
    text = summary_markdown("tlflow", paths, before, Snapshot.take(paths), [])
    assert (f"- new images: {NOVEL} of {NOVEL + KNOWN} look unlike the training set (novel: "
            "k-NN distance beyond the val threshold)") in text


def test_the_report_shows_the_novel_ones_while_the_data_is_the_same(runs, tmp_path: Path):
    params, _, _, report = runs
    paths = params.base.paths
    view = new_images_view(paths, Thumbnails(tmp_path, paths.images))
    assert view is not None and len(view["shown"]) == NOVEL
    assert all(g["thumb"] for g in view["shown"])
    saved = paths.manifest.read_bytes()
    try:  # another manifest: the judgement is not this data's
        paths.manifest.write_bytes(saved + b"\n")
        assert drift.this_run(paths) is None
    finally:
        paths.manifest.write_bytes(saved)
    drift.forget(paths)
    assert drift.this_run(paths) is None
    report.write(paths.new_images)


def test_a_probe_of_another_extractor_cannot_judge(runs, tmp_path: Path):
    """The previous probe read another extractor's codes (extract's params changed): no
    codes of theirs for the new images, and one line saying so, never a crash."""
    params, _, new, _ = runs
    paths = params.base.paths
    moved = tmp_path / "features"
    shutil.copytree(paths.features, moved)
    shutil.rmtree(paths.features)
    try:
        paths.features.mkdir()
        report = drift.judge(paths, new)
    finally:
        shutil.rmtree(paths.features)
        shutil.copytree(moved, paths.features)
    assert report.novel is None and "whose codes this run did not compute" in report.reason
    assert drift.line(report).startswith(f"new images: {len(new)}, not judged: the previous "
                                         "probe reads layer blocks.1 of extractor ")


def _head(reference: np.ndarray, threshold: float) -> LinearHead:
    d = reference.shape[1]
    return LinearHead(weight=np.zeros((2, d)), bias=np.zeros(2), mean=np.zeros(d),
                      scale=np.ones(d), classes=("a", "b"),
                      meta={"novelty": {"k": 1, "threshold": threshold}},
                      reference=reference.astype(np.float16))


def test_novel_codes_flags_what_lies_beyond_the_threshold():
    head = _head(np.eye(3), threshold=0.5)
    codes = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    distance, novel = trust.novel_codes(head, codes)
    np.testing.assert_allclose(distance, [0.0, np.sqrt(2 - np.sqrt(2)), 0.0], atol=1e-3)
    assert novel.tolist() == [False, True, False]  # directions: the length does not count
    assert trust.novel_codes(head, np.zeros((0, 3)))[1].shape == (0,)
    with pytest.raises(ValueError, match=r"the head reads \(N, 3\)"):
        trust.novel_codes(head, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no novelty reference"):
        trust.novel_codes(LinearHead(head.weight, head.bias, head.mean, head.scale,
                                     head.classes), codes)


def test_the_line_reads_for_one_image_and_for_none_judged():
    one = NewImages(new=1, novel=0)
    assert drift.line(one) == ("new images: 0 of 1 looks unlike the training set (novel: "
                               "k-NN distance beyond the val threshold)")
    assert drift.line(NewImages(new=3, novel=None, reason="why")) == \
        "new images: 3, not judged: why"
