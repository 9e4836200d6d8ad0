"""Folders tlflow owns: marked when it writes into them; someone else's folder is refused
before anything is written; clean-ups remove only what tlflow recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_params
from tlflow.flows.stages import stage_runner
from tlflow.tasks import ingest
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.data import ownership


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ingest_marks_the_snapshot_folder(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    ingest.run(params)
    assert ownership.marked(params.base.paths.images)
    marker = (params.base.paths.images / ownership.MARKER).read_bytes()
    ingest.run(params)  # the same bytes every run: DVC sees no change
    assert (params.base.paths.images / ownership.MARKER).read_bytes() == marker


@pytest.mark.parametrize("key", ["images", "features", "finetune_checkpoints"])
def test_a_folder_of_someone_elses_files_is_refused_before_anything_is_written(
        tmp_path: Path, image_folder: Path, key: str):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    folder = getattr(params.base.paths, key)
    (folder / "thesis").mkdir(parents=True)
    (folder / "thesis" / "chapter1.tex").write_text("years of work")
    (folder / "state.json").write_text("{}")  # a name tlflow uses, in a folder not its own
    before = _tree(tmp_path)
    stage = ownership.FOLDERS[key]
    with pytest.raises(TlflowError) as err:
        stage_runner(stage)(params)
    message = str(err.value)
    assert "\n" not in message and f"base.paths.{key}: {folder}" in message
    assert "did not write" in message
    assert _tree(tmp_path) == before  # nothing written, nothing removed


def test_a_snapshot_written_before_markers_is_accepted_and_marked(tmp_path: Path,
                                                                   image_folder: Path):
    """An existing project: data/images has no marker, but every file in it is listed by the
    last manifest, so it is tlflow's."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    ingest.run(params)
    (params.base.paths.images / ownership.MARKER).unlink()
    (image_folder / "red" / "00.png").unlink()
    rows = ingest.run(params)
    assert len(rows) == 35 and ownership.marked(params.base.paths.images)
    assert not (params.base.paths.images / "red" / "00.png").exists()  # pruned: it was listed


def test_a_marked_folder_keeps_files_tlflow_did_not_write(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    ingest.run(params)
    (params.base.paths.images / "notes.txt").write_text("mine")
    ingest.run(params)
    assert (params.base.paths.images / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("key", "files", "ok"), [
    ("features", ["0123456789abcdef.h5", "0123456789abcdef.h5.lock", "current.json",
                  ".tlflow-abcd1234.tmp"], True),
    ("features", ["0123456789abcdef.h5", "results.h5"], False),
    ("finetune_checkpoints", ["state.json", "epoch-0003.safetensors",
                              "all/best-0001.safetensors", "all/state.json"], True),
    ("finetune_checkpoints", ["state.json", "model.safetensors"], False),
])
def test_what_tlflow_wrote_before_markers(tmp_path: Path, key: str, files: list[str], ok: bool):
    folder = tmp_path / key
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_bytes(b"x")
    if ok:
        ownership.check(key, folder, ownership.recognised(key))
    else:
        with pytest.raises(TlflowError, match=rf"base\.paths\.{key}: .* did not write"):
            ownership.check(key, folder, ownership.recognised(key))


def test_a_file_or_a_symlink_where_a_folder_belongs_is_refused(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    for name in ("file", "link"):
        with pytest.raises(TlflowError, match=rf"base\.paths\.features: .*{name} is a"):
            ownership.check("features", tmp_path / name, ownership.recognised("features"))
