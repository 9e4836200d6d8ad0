"""The import graph read from the source, and the code stamp DVC reads: a stage reruns when
the tlflow code it runs changed, and only then."""

from pathlib import Path

import pytest
import yaml

from tlflow import __version__
from tlflow.tasks.lib.core.codedeps import (
    STAGES,
    STAMP,
    closure,
    code_hash,
    describe_change,
    imports_of,
    read_stamp,
    refresh_stamp,
    source_dirs,
    stamp,
)


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_imports_anywhere_in_a_module_count(tmp_path: Path):
    root = _package(tmp_path, {
        "tlflow/__init__.py": '"""doc"""\n',
        "tasks/__init__.py": '"""doc"""\n',
        "tasks/lib/__init__.py": '"""doc"""\n',
        "tasks/lib/a.py": "import os\n",
        "tasks/lib/b.py": "from tlflow.tasks.lib import a\n",
        "tasks/lib/c.py": "def f():\n    from tlflow.tasks.lib.b import x\n",
        "tasks/stage.py": "import tlflow.tasks.lib.c\nfrom tlflow.tasks.lib.nothere import y\n",
    })
    dirs = source_dirs(root)
    assert imports_of(root / "tasks/lib/b.py", dirs) == {"tlflow.tasks.lib.a"}
    assert imports_of(root / "tasks/lib/c.py", dirs) == {"tlflow.tasks.lib.b"}  # in a function
    assert closure("tlflow.tasks.stage", dirs) == (
        "tlflow.tasks.lib.a", "tlflow.tasks.lib.b", "tlflow.tasks.lib.c", "tlflow.tasks.stage")


def _tree(root: Path, probe: str = "", decode: str = "") -> dict[str, Path]:
    """A small tlflow laid out as the repository is: extract decodes, train probes."""
    files = {"tlflow/__init__.py": "", "tasks/__init__.py": "", "tasks/lib/__init__.py": "",
             "tasks/lib/data/__init__.py": "", "tasks/lib/probe/__init__.py": "",
             "tasks/lib/data/decode.py": "def read(): pass\n" + decode,
             "tasks/lib/probe/sweep.py": "def fit(): pass\n" + probe,
             "tasks/ingest.py": "import os\n",
             "tasks/extract.py": "from tlflow.tasks.lib.data import decode\n",
             "tasks/train.py": "from tlflow.tasks.lib.probe import sweep\n",
             "tasks/finetune.py": "from tlflow.tasks.lib.data import decode\n"
                                  "from tlflow.tasks.lib.probe.sweep import fit\n",
             "tasks/evaluate.py": "import tlflow.tasks.lib.data.decode\n"
                                  "from tlflow.tasks.lib.probe import sweep\n",
             "tasks/audit.py": "from tlflow.tasks.lib.probe import sweep\n"}
    return source_dirs(_package(root, files))


def _stale(old: dict, new: dict) -> set[str]:
    return {s for s in STAGES if old[s] != new[s]}


def test_an_edit_changes_exactly_the_stages_that_import_it(tmp_path: Path):
    """Decoding reruns extract and what reads images; the probe reruns train onward, not
    extract; the same code changes nothing."""
    first = stamp(None, _tree(tmp_path / "a"))
    assert stamp(first, _tree(tmp_path / "b")) == first  # the same code elsewhere
    decode = stamp(first, _tree(tmp_path / "c", decode="# faster\n"))
    assert _stale(first, decode) == {"extract", "finetune", "evaluate"}
    probe = stamp(first, _tree(tmp_path / "d", probe="# other C grid\n"))
    assert _stale(first, probe) == {"train", "finetune", "evaluate", "audit"}
    assert all(entry["version"] == __version__ for entry in probe.values())


def test_an_unchanged_stage_keeps_the_version_its_code_came_with(tmp_path: Path):
    """A release that did not touch a stage's code leaves its entry, version and all: DVC
    compares the whole entry, so the stage stays up to date."""
    dirs = _tree(tmp_path)
    old = {s: {"sha256": code_hash(s, dirs), "version": "0.0.9"} for s in STAGES}
    old["train"] = {"sha256": "0" * 64, "version": "0.0.9"}
    new = stamp(old, dirs)
    assert {s: e["version"] for s, e in new.items()} == {
        **{s: "0.0.9" for s in STAGES}, "train": __version__}
    assert describe_change("train", old["train"], new["train"]) == (
        f"tlflow's train code changed (0.0.9 → {__version__})")
    assert "edited" in describe_change("train", {**old["train"], "version": __version__},
                                       new["train"])


def test_refresh_writes_only_in_a_project_and_only_on_change(tmp_path: Path):
    assert not refresh_stamp(tmp_path)  # no dvc.yaml: not a project
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert refresh_stamp(tmp_path)
    text = (tmp_path / STAMP).read_text()
    assert text.startswith("# Written by tlflow")
    assert set(yaml.safe_load(text)) == set(STAGES) == set(read_stamp(tmp_path / STAMP))
    assert not refresh_stamp(tmp_path)  # the same code: the file is not touched
    (tmp_path / STAMP).write_text("not: [a, mapping")  # damaged: rewritten whole
    assert refresh_stamp(tmp_path) and read_stamp(tmp_path / STAMP).keys() == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_the_installed_stages_hash_their_own_modules(stage: str):
    assert len(code_hash(stage)) == 64
