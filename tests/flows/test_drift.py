"""A run's new images judged by the probe that served before it (flows/drift.py), on a tiny
colour project run in this process: a batch of unseen-looking images (yellow, noise) and a
few of a known class, added after the first run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    COLOURS,
    cli_env,
    colour_images,
    colour_project,
    make_params,
    run_cli,
    write_image,
)
from tlflow.flows import drift
from tlflow.flows.artifacts import Snapshot, summary_markdown
from tlflow.flows.html_report import Thumbnails, new_images_view
from tlflow.tasks import extract, ingest, train
from tlflow.tasks.lib.core.handoff.flow import NewImages
from tlflow.tasks.lib.probe import trust
from tlflow.tasks.lib.probe.head import HeadMeta, LinearHead, Novelty

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
                      meta=HeadMeta(layer="pooled", extractor_id="e", novelty=Novelty(
                          k=1, threshold=threshold, rate=0.05, threshold_on="val",
                          reference_rows=len(reference), train_rows=len(reference))),
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
                                     head.classes, HeadMeta(layer="pooled", extractor_id="e")),
                          codes)


def test_the_line_reads_for_one_image_and_for_none_judged():
    one = NewImages(new=1, novel=0)
    assert drift.line(one) == ("new images: 0 of 1 looks unlike the training set (novel: "
                               "k-NN distance beyond the val threshold)")
    assert drift.line(NewImages(new=3, novel=None, reason="why")) == \
        "new images: 3, not judged: why"


@pytest.mark.accuracy  # two `tlflow run`s (about 30 s): longer than the suite allows
def test_tlflow_run_says_how_many_new_images_are_novel(tmp_path: Path, prefect_server: str):
    """The flow end to end: a first run judges nothing; a second, after the batch, says in
    its output, its summary artifact and its report how many new images are novel."""
    import httpx

    root = colour_project(tmp_path, extract={"layers": ["blocks.1"]})
    env = cli_env(root, prefect_server)
    first = run_cli(["tlflow", "run"], root, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "new images" not in first.stdout + first.stderr
    assert not (root / "report/new_images.json").exists()
    _add_batch(tmp_path / "src")
    second = run_cli(["tlflow", "run"], root, env)
    assert second.returncode == 0, second.stdout + second.stderr
    said = (f"new images: {NOVEL} of {NOVEL + KNOWN} look unlike the training set (novel: "
            "k-NN distance beyond the val threshold)")
    assert said in second.stdout, second.stdout
    page = (root / "report/index.html").read_text()
    assert 'id="new-images"' in page and page.count("noise") + page.count("yellow") >= NOVEL
    response = httpx.post(f"{prefect_server}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["tlflow-run-summary"]}}, "sort": "CREATED_DESC",
        "limit": 1})
    assert f"- {said}" in response.json()[0]["data"]


@pytest.mark.accuracy  # hymenoptera at 224 px: about a minute
def test_digits_brought_to_a_photo_probe_are_novel_and_photos_are_not(tmp_path: Path,
                                                                      hymenoptera: Path):
    """A project on hymenoptera's train/ photos (245, split train/val/test by the fractions);
    then a batch of its val/ photos (153, new to the project) and 200 of scikit-learn's
    digits (under ants/: the labels play no part): the digits are novel (at least 90%),
    the photos are not (at most 5%)."""
    from tests.test_accuracy import _digit_images
    from tlflow.tasks.lib.features.store import FeatureStore, store_path
    from tlflow.tasks.lib.probe.head import load_head

    src = tmp_path / "src"
    shutil.copytree(hymenoptera / "train", src)
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(src)})
    paths = params.base.paths
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        for stage in (ingest, extract, train):
            stage.run(params)
        head = load_head(paths.head)
        before = Snapshot.take(paths).images
        for f in sorted((hymenoptera / "val").glob("*/*")):
            shutil.copy(f, src / f.parent.name / f"new_{f.name}")
        _digit_images(src / "ants" / "digits", 200)
        ingest.run(params)
        extract.run(params)
        new = drift.to_judge(paths, before)
        report = drift.record(paths, new)
        with FeatureStore(store_path(paths.features, head.meta.extractor_id)) as s:
            codes = s.read(head.meta.layer, [r.sha256 for r in new])
    novel = trust.novel_codes(head, codes)[1]
    digit = np.array(["/digits/" in r.relpath for r in new])
    print(f"\n{drift.line(report)}; digits {novel[digit].sum()} of {digit.sum()}, photos "
          f"{novel[~digit].sum()} of {(~digit).sum()} (threshold {report.threshold:.3f})")
    assert (report.new, digit.sum(), report.novel) == (353, 200, novel.sum())
    assert novel[digit].mean() >= 0.9 and novel[~digit].mean() <= 0.05
