import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import COLOURS, make_params, write_image
from tlflow.tasks import ingest
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.data.sources import assign_split


def test_assign_split_is_stable_and_proportional():
    shas = [f"{i:064x}" for i in range(4000)]
    splits = [assign_split(s, 0, 0.15, 0.15) for s in shas]
    assert splits == [assign_split(s, 0, 0.15, 0.15) for s in shas]
    counts = Counter(splits)
    assert abs(counts["test"] / 4000 - 0.15) < 0.03
    assert abs(counts["val"] / 4000 - 0.15) < 0.03
    assert splits != [assign_split(s, 1, 0.15, 0.15) for s in shas]  # the seed matters


def test_folder_source(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    rows = ingest.run(params)
    assert len(rows) == 36
    assert {r.label for r in rows} == set(COLOURS)
    assert read_manifest(params.base.paths.manifest) == rows
    for r in rows:  # the snapshot holds the same bytes the manifest hashes
        assert (params.base.paths.images / r.relpath).read_bytes() == (
            image_folder / r.relpath
        ).read_bytes()


def test_adding_images_never_moves_old_ones(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    before = {r.relpath: r.split for r in ingest.run(params)}
    for i in range(12, 30):
        write_image(image_folder / "red" / f"{i:02d}.png", COLOURS["red"], seed=999 + i)
    (image_folder / "blue" / "00.png").unlink()
    after = {r.relpath: r.split for r in ingest.run(params)}
    assert len(after) == 36 + 18 - 1
    assert all(after[k] == v for k, v in before.items() if k in after)
    assert not (params.base.paths.images / "blue" / "00.png").exists()  # snapshot mirrors


def test_split_folder_val_becomes_test(tmp_path: Path, image_folder: Path):
    root = tmp_path / "split"
    for split in ("train", "val"):
        shutil.copytree(image_folder, root / split)
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(root)})
    rows = ingest.run(params)
    assert all(r.split == "test" for r in rows if r.relpath.startswith("val/"))
    train_side = Counter(r.split for r in rows if r.relpath.startswith("train/"))
    assert set(train_side) == {"train", "val"}  # val carved out of train/, no test there


def test_csv_source_with_given_split(tmp_path: Path, image_folder: Path):
    lines = ["path,label,split"]
    for name in COLOURS:
        for i in range(12):
            lines.append(f"{name}/{i:02d}.png,{name},{'test' if i < 3 else ''}")
    csv_path = image_folder / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    params = make_params(tmp_path, ingest={"source": "csv", "path": str(csv_path)})
    rows = ingest.run(params)
    assert sum(r.split == "test" for r in rows) == 9
    assert {r.split for r in rows} == {"train", "val", "test"}


def test_digits_source_writes_pngs(tmp_path: Path):
    params = make_params(tmp_path)
    rows = ingest.run(params)
    assert len(rows) == 1797 and len({r.label for r in rows}) == 10
    first = params.base.paths.images / rows[0].relpath
    mtime = first.stat().st_mtime_ns
    ingest.run(params)  # unchanged bytes are not rewritten
    assert first.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- bad input


def test_missing_folder(tmp_path: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(TlflowError, match=r"ingest.path: folder .*nope does not exist"):
        ingest.run(params)


def test_class_folder_without_images(tmp_path: Path, image_folder: Path):
    (image_folder / "empty").mkdir()
    (image_folder / "empty" / "notes.txt").write_text("no images here")
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    with pytest.raises(TlflowError, match=r"class folder .*empty holds no images"):
        ingest.run(params)


def test_folder_source_needs_path(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"ingest\.path: required"):
        ingest.run(make_params(tmp_path, ingest={"source": "folder"}))


def test_unknown_label_in_csv(tmp_path: Path, image_folder: Path):
    csv_path = image_folder / "labels.csv"
    rows = [f"{c}/{i:02d}.png,{c}," for c in ("red", "blue") for i in range(6)]
    rows.append("green/00.png,green,test")  # no train row has 'green'
    csv_path.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    params = make_params(tmp_path, ingest={"source": "csv", "path": str(csv_path)})
    with pytest.raises(TlflowError, match=r"label 'green' of green/00\.png is unknown"):
        ingest.run(params)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("file,label\nred/00.png,red\n", "missing column(s) ['path']"),
        ("path,label\nred/99.png,red\n", "labels.csv:2: image"),
        ("path,label\n../x.png,red\n", "without '..'"),
        ("path,label,split\nred/00.png,red,holdout\n", "unknown split 'holdout'"),
        ("path,label\nred/00.png,\n", "empty label"),
    ],
)
def test_bad_csv_rows(tmp_path: Path, image_folder: Path, content: str, needle: str):
    csv_path = image_folder / "labels.csv"
    csv_path.write_text(content)
    params = make_params(tmp_path, ingest={"source": "csv", "path": str(csv_path)})
    with pytest.raises(TlflowError) as err:
        ingest.run(params)
    assert needle in str(err.value)


def test_an_empty_test_split_stops_ingest_not_evaluate(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder),
                                           "test_fraction": 0.0})
    with pytest.raises(TlflowError, match=r"ingest\.test_fraction"):
        ingest.run(params)
    assert not params.base.paths.manifest.exists()  # no stage downstream has anything to run on


def test_a_refused_input_leaves_the_last_good_snapshot(tmp_path: Path, image_folder: Path):
    """Ingest validates the new manifest before it touches data/: a class left without train
    images is refused (exit 2) and every file of the last good run stays as it was."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    rows = ingest.run(params)
    data = params.base.paths.manifest.parent

    def files() -> dict[str, bytes]:
        return {p.relative_to(data).as_posix(): p.read_bytes()
                for p in sorted(data.rglob("*")) if p.is_file()}

    before = files()
    for r in rows:
        if r.label == "blue" and r.split == "train":
            (image_folder / r.relpath).unlink()
    with pytest.raises(TlflowError, match=r"\['blue'\] have no image in the train split"):
        ingest.run(params)
    assert files() == before


def test_clean_up_removes_only_what_ingest_wrote(tmp_path: Path, image_folder: Path):
    """A file the source no longer has leaves the snapshot; a file tlflow never wrote there
    stays (the last manifest is the record of what ingest created)."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    ingest.run(params)
    images = params.base.paths.images
    (images / "notes.txt").write_text("not tlflow's")
    (image_folder / "red" / "00.png").unlink()
    ingest.run(params)
    assert (images / "notes.txt").read_text() == "not tlflow's"
    assert not (images / "red" / "00.png").exists() and (images / "red" / "01.png").exists()
