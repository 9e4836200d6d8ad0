"""What changed since a committed run, in the report (`tlflow report [--against REV]`), on a
tiny committed project: real git and DVC, the older run read through dvc.api at its commit."""

from __future__ import annotations

import csv
import html
import io
import re
from pathlib import Path

import pytest

from tests.conftest import COLOURS, colour_images, copy_project, write_image
from tests.lib.test_registry import git, inside, run_and_commit, set_params
from tlflow.flows.cli import main
from tlflow.tasks.lib.core.params import load_params

STAGES = ("ingest", "extract", "train", "finetune", "evaluate")  # finetune off: its sidecar
RERUN = ("train", "finetune", "evaluate")


def _verdicts(text: str) -> dict[str, bool]:
    """relpath -> the probe right, from a predictions CSV's text."""
    return {r["relpath"]: r["correct"] == "1" for r in csv.DictReader(io.StringIO(text))
            if r["model"] == "probe"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `good` committed; then two red images added, a green one removed and a probe that
    barely fits (C tiny, no standardization), run `bad` committed; then the good probe again
    in the working tree, not committed."""
    base = tmp_path_factory.mktemp("changes")
    src = colour_images(base / "src")
    root = copy_project(base / "project")
    git(root, "config", "user.name", "t")
    git(root, "config", "user.email", "t@t")
    set_params(root, ingest={"source": "folder", "path": str(src)},
               extract={"layers": ["pooled"], "image_size": 32, "precision": "fp32"})
    good = run_and_commit(root, STAGES, "good")
    paths = load_params(root / "params.yaml").base.paths
    for i in (12, 13):
        write_image(src / "red" / f"{i}.png", COLOURS["red"], seed=900 + i)
    (src / "green" / "00.png").unlink()
    trained = yaml_train(root)
    set_params(root, train={"C_grid": [1e-6], "normalize": "none"})
    bad = run_and_commit(root, STAGES, "bad")
    bad_preds = (root / paths.predictions).read_text()
    with inside(root):  # the bad run against the good one: what it broke
        assert main(["report", "--against", good]) == 0
    broke_page = (root / paths.report).read_text()
    set_params(root, train=trained)
    with inside(root):
        for stage in RERUN:
            assert main(["stage", stage]) == 0
    return {"root": root, "paths": paths, "good": good, "bad": bad,
            "good_preds": git(root, "show", f"{good}:{paths.predictions.as_posix()}"),
            "bad_preds": bad_preds, "broke_page": broke_page,
            "now_preds": (root / paths.predictions).read_text()}


def yaml_train(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / "params.yaml").read_text())["train"]


def _report(project: dict, capsys, *args: str) -> str:
    with inside(project["root"]):
        assert main(["report", *args]) == 0
    capsys.readouterr()
    return (project["root"] / project["paths"].report).read_text()


def _listed(page: str, kind: str) -> set[str]:
    section = page.split(f'id="gallery-newly-{kind}-probe"')[1].split("</div>\n</div>")[0]
    return {html.unescape(r) for r in re.findall(r'data-relpath="([^"]*)"', section)}


def _section(page: str) -> str:
    return page.split('id="changes"')[1].split('<h2 id="confusion')[0]


def test_against_head_the_newly_right_images_and_the_classes(project, capsys):
    """Against HEAD (the bad probe): the images the good probe fixed, a class's delta."""
    page = _report(project, capsys)
    then, now = _verdicts(project["bad_preds"]), _verdicts(project["now_preds"])
    fixed = {r for r in now if now[r] and r in then and not then[r]}
    assert fixed, "the barely fitting probe should get some test image wrong"
    section = _section(page)
    assert f"What changed since HEAD ({project['bad'][:7]})" in section
    assert 'id="gallery-newly-wrong-probe"' not in section  # none: "None."
    assert _listed(section, "right") == fixed
    assert f"Newly right: probe ({len(fixed)} of the {len(then.keys() & now.keys())}" in section
    row = re.search(r'<tr data-class="red"><td class="l">probe</td>.*?</tr>', section).group(0)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    assert float(cells[4]) == pytest.approx(float(cells[3]) - float(cells[2]), abs=1e-3)
    assert "No image added or removed." in section  # bad and now: the same data


def test_against_an_older_commit_the_newly_wrong_images_and_the_data(project):
    """The bad run against the good one (`--against` its commit): newly wrong are the images
    the bad probe broke; the data: two red images added, one green removed."""
    section = _section(project["broke_page"])
    assert f"What changed since {project['good'][:7]}<" in section
    then, now = _verdicts(project["good_preds"]), _verdicts(project["bad_preds"])
    broke = {r for r in now if not now[r] and r in then and then[r]}
    assert broke, "the barely fitting probe should break some test image"
    assert _listed(section, "wrong") == broke
    data = section.split('id="changes-data"')[1].split("</table>")[0]
    red = re.search(r'<tr data-class="red">(.*?)</tr>', data).group(1)
    green = re.search(r'<tr data-class="green">(.*?)</tr>', data).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", red)[1] == "2"
    assert re.findall(r"<td[^>]*>([^<]*)</td>", green)[3] == "1"
    assert 'data-class="blue"' not in data
    assert "36 images then, 37 now" in section


def test_a_bad_revision_is_one_line_and_exit_2(project, capsys):
    before = (project["root"] / project["paths"].report).stat().st_mtime_ns
    with inside(project["root"]):
        code = main(["report", "--against", "no-such-rev"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "no-such-rev" in err
    assert (project["root"] / project["paths"].report).stat().st_mtime_ns == before


def test_a_commit_without_a_run_is_a_note(project, capsys):
    """The first commit (the project's files, no run): the page says so, no crash."""
    first = git(project["root"], "rev-list", "--max-parents=0", "HEAD").strip()
    section = _section(_report(project, capsys, "--against", first))
    assert "no committed run to compare with" in section
    assert "has no per-image predictions" in section
