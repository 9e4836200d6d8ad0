"""The audit stage and the offline HTML report on a tiny colour project: a planted near-copy,
a flipped train label and a mislabelled test image are found, the gallery lists exactly the
test images the probe gets wrong, and the page loads nothing from the network."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import COLOURS, make_params
from tlflow.flows.html_report import write_report
from tlflow.tasks import audit, evaluate, extract, ingest, train
from tlflow.tasks.lib.core.handoff.evaluate import Predictions


def write_image(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    """A 48 px image of one dominant colour with a pattern of its own (a smooth random
    4 x 4 grid, upsampled): distinct images differ in structure, not only in pixel noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = rng.uniform(-90, 90, (4, 4, 3)) + np.array(colour)
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    small.resize((48, 48), Image.Resampling.BICUBIC).save(path)
    return path

ODD = "test/blue/<b>&amp; \"x\".png"  # red labelled blue: in the gallery, shown, never interpreted


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """train/val/test colour images; a re-encoded copy of a train image in test (the JPEG,
    resized and cropped copies are measured on real photos: bench/report.py), a red image
    labelled blue in train and one in test; every stage up to audit, then the report."""
    base = tmp_path_factory.mktemp("report")
    src = base / "src"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for split, n in (("train", 10), ("val", 4), ("test", 4)):
            for i in range(n):
                write_image(src / split / name / f"{i:02d}.png", colour, seed=1000 * c + 50 *
                            len(split) + i)
    write_image(src / "train" / "blue" / "flipped.png", COLOURS["red"], seed=7)
    write_image(src / "test" / "blue" / "wrong.png", COLOURS["red"], seed=8)
    write_image(src / ODD, COLOURS["red"], seed=9)
    with Image.open(src / "train" / "green" / "03.png") as im:  # other bytes, same pixels
        im.save(src / "test" / "green" / "copy.png", compress_level=1)
    params = make_params(base, ingest={"source": "folder", "path": str(src)},
                         extract={"layers": ["pooled"], "image_size": 32})
    for stage in (ingest, extract, train, evaluate, audit):
        stage.run(params)
    return params, write_report(params.base.paths, {})


def test_the_audit_finds_the_near_copy_and_the_flipped_label(project):
    params, _ = project
    paths = params.base.paths
    dups = json.loads(paths.duplicates.read_text())
    pairs = {(p["image"]["relpath"], p["train_image"]["relpath"])
             for p in dups["near_duplicates"]["pairs"]}
    assert ("test/green/copy.png", "train/green/03.png") in pairs
    issues = json.loads(paths.label_issues.read_text())
    assert "train/blue/flipped.png" in {i["relpath"] for i in issues["images"]}
    assert json.loads(paths.audit_metrics.read_text())["label_issues"] == \
        issues["count"]
    balance = json.loads(paths.balance.read_text())
    assert balance["splits"]["train"] == {"blue": 11, "green": 10, "red": 10}


def test_the_gallery_lists_exactly_the_misclassified_images(project):
    params, written = project
    paths = params.base.paths
    wrong = {p.relpath for p in Predictions.read(paths.predictions).rows if not p.correct}
    assert "test/blue/wrong.png" in wrong
    html = paths.report.read_text()
    gallery = html.split('id="gallery-probe"')[1].split("<h2")[0]
    listed = re.findall(r'data-relpath="([^"]*)"', gallery)
    import html as html_lib

    assert {html_lib.unescape(r) for r in listed} == wrong
    assert written.misclassified == {"probe": len(wrong)}
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert src.startswith("data:image/png;base64,") or (paths.report.parent / src).is_file()
    assert "&lt;b&gt;&amp;amp; &#34;x&#34;.png" in html and "<b>&amp;" not in html


def test_the_page_loads_nothing_from_the_network(project):
    params, _ = project
    html = params.base.paths.report.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html
    assert "default-src 'none'" in html  # Chromium refuses any other source


def test_the_page_shows_the_probe_sweep_as_inline_svg(project):
    """Why this model: the sweep drawn inline (SVG, no script), its chosen (layer, C) named;
    a second report with the same sweep reuses the drawn chart."""
    params, _ = project
    paths = params.base.paths
    best = json.loads(paths.probe_report.read_text())["best"]
    section = paths.report.read_text().split('id="sweep"')[1].split("<h2")[0]
    assert "<svg" in section and "<script" not in section
    assert f"{best['layer']} at C={best['C']:g}" in section
    assert ">val accuracy<" in section and section.count("<path") > 3  # axes, line, ring
    cached = list((paths.report.parent / "sweep").glob("*.svg"))
    assert len(cached) == 1 and cached[0].read_text() in section
    before = cached[0].stat().st_mtime_ns
    write_report(paths, {})
    assert cached[0].stat().st_mtime_ns == before  # not drawn again


def test_the_map_has_one_point_per_test_image_the_wrong_ones_ringed(project):
    params, _ = project
    paths = params.base.paths
    preds = [p for p in Predictions.read(paths.predictions).rows if p.model == "probe"]
    section = paths.report.read_text().split('id="map"')[1].split("<h2")[0]
    points = re.findall(r'<g data-relpath="([^"]*)"><title>([^<]*)</title><circle ([^>]*)/>'
                        r'(<image class="tip" href="([^"]+)")?', section)
    assert len(points) == len(preds) >= 5
    by_path = {html.unescape(rel): (title, circle, thumb) for rel, title, circle, _, thumb
               in points}
    for p in preds:
        title, circle, thumb = by_path[p.relpath]
        assert f"label {p.label}, predicted {p.top[0]}" in html.unescape(title)
        assert ('stroke="#000"' in circle) == (not p.correct), p.relpath
        assert (paths.report.parent / thumb).is_file()
    assert "<script" not in section
    assert len(list((paths.report.parent / "map").glob("*.json"))) == 1  # kept for next time


def test_the_map_keeps_every_wrong_image_when_it_subsamples():
    from tlflow.flows.embedding_map import subsample
    from tlflow.tasks.lib.core.handoff.evaluate import ImagePrediction

    preds = [ImagePrediction(model="probe", relpath=f"{i}.png", sha256=f"{i:064x}", label="a",
                             top=("a" if i % 7 else "b",), scores=(1.0,), kind="probability",
                             loss=0.0, correct=bool(i % 7)) for i in range(100)]
    shown = subsample(preds, 30, seed=0)
    assert len(shown) == 30 and shown == sorted(shown, key=lambda p: int(p.relpath[:-4]))
    assert {p.relpath for p in preds if not p.correct} <= {p.relpath for p in shown}
    assert subsample(preds, 30, seed=0) == shown and subsample(preds, 200, 0) == preds
    mostly_wrong = [p.model_copy(update={"correct": not p.correct}) for p in preds]  # 85 wrong
    half = subsample(mostly_wrong, 30, seed=0)  # at most half wrong: the data's shape stays
    assert len(half) == 30 and sum(not p.correct for p in half) == 15


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_chromium_renders_the_page_offline(project, tmp_path: Path):
    """Headless Chromium with every network request sent to a dead proxy: the page renders,
    its thumbnails included."""
    params, _ = project
    page = params.base.paths.report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--proxy-server=127.0.0.1:9", "--window-size=1000,1400"]
    subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=1800,
                   check=True)
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and thumbnails, not blank
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True,
                         timeout=1800, check=True).stdout
    assert "Misclassified test images: probe" in dom and "test/blue/wrong.png" in dom


def test_a_run_on_other_data_says_so(project):
    """Compared with a run on other data, the page says the changes mix data and model."""
    from tlflow.flows.artifacts import Snapshot
    from tlflow.flows.html_report import write_html_report

    params, _ = project
    line = write_html_report(params.base.paths, Snapshot("0000other", frozenset(), {}))
    assert line.startswith("report: ")
    html = params.base.paths.report.read_text()
    assert "on other data (data version 0000other)" in html
    write_html_report(params.base.paths, Snapshot.take(params.base.paths))
    assert "on other data" not in params.base.paths.report.read_text()


def test_a_weak_probe_s_label_errors_come_with_a_warning(project):
    params, _ = project
    paths = params.base.paths
    issues = json.loads(paths.label_issues.read_text())
    assert 0.9 <= issues["oof_accuracy"] <= 1  # colours: the probes agree with the labels
    assert 'class="warn"' not in paths.report.read_text()
    original = paths.label_issues.read_bytes()
    try:
        paths.label_issues.write_text(json.dumps({**issues, "oof_accuracy": 0.6}))
        write_report(paths, {})
        assert "agree with only 60 % of the given labels" in paths.report.read_text()
    finally:
        paths.label_issues.write_bytes(original)
        write_report(paths, {})


def test_the_page_shows_the_backbone_comparison_when_one_ran(project):
    from tlflow.tasks.lib.assess import compare
    from tlflow.tasks.lib.core.handoff.train import CompareRow
    params, _ = project
    paths = params.base.paths
    assert 'id="compare"' not in paths.report.read_text()  # extract.compare: []
    rows = [CompareRow(backbone=f"timm/{n}", extractor_id=f"id{i}", input_size=224,
                       code_dim=1280, layer="pooled", C=1.0, val_accuracy=acc, n_val=42,
                       test_accuracy=0.95, images_per_s=60.0, gflops=g, parameters=5_000_000,
                       store_mb=1.7)
            for i, (n, acc, g) in enumerate([("tf_efficientnet_lite0", 0.9524, 0.77),
                                             ("tf_efficientnet_lite1", 0.9762, 1.20)])]
    before = paths.compare_report.read_bytes()
    try:
        compare.report(rows, compare.pick(rows)).write(paths.compare_report)
        write_report(paths, {})
        section = paths.report.read_text().split('id="compare"')[1].split("<h2")[0]
    finally:
        paths.compare_report.write_bytes(before)
        write_report(paths, {})
    assert "<td class=\"l\">*tf_efficientnet_lite1</td>" in section
    assert "<td>0.9524</td>" in section and compare.RULE in section


def test_the_page_shows_accuracy_against_coverage(project):
    """Abstain: evaluate's coverage table (one row per min confidence) and the ECEs."""
    params, _ = project
    section = params.base.paths.report.read_text().split('id="coverage"')[1].split("<h2")[0]
    assert [row.split("</td>")[0] for row in section.split("<tr><td>")[1:]] == [
        "0.5", "0.8", "0.9", "0.95"]
    assert "expected calibration error on the test images" in section
