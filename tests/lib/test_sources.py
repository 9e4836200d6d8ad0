"""Sources: what in a folder or a CSV is data, and what is OS / archive litter, counted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import COLOURS, make_params
from tlflow.tasks import ingest
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.data.imagefiles import image_files, metadata_kind
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.data.sources import scan_csv, scan_folder

APPLEDOUBLE = b"\x00\x05\x16\x07AppleDouble"


def add_mac_litter(root: Path) -> int:
    """What a zip made on a Mac and a few tools leave in a class folder tree; returns the
    number of files added."""
    n = 0
    for cls in COLOURS:
        for img in sorted((root / cls).glob("*.png")):
            mac = root / "__MACOSX" / cls / f"._{img.name}"
            mac.parent.mkdir(parents=True, exist_ok=True)
            mac.write_bytes(APPLEDOUBLE)
            n += 1
        (root / cls / "._00.png").write_bytes(APPLEDOUBLE)  # AppleDouble beside the image
        (root / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        cache = root / cls / ".ipynb_checkpoints"  # a hidden folder inside a class folder
        cache.mkdir()
        shutil.copy(root / cls / "00.png", cache / "00-checkpoint.png")
        n += 4
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "desktop.ini").write_text("[.ShellClassInfo]\n")
    hidden = root / ".cache" / "thumbs"  # a hidden folder at the top: not a class
    hidden.mkdir(parents=True)
    shutil.copy(root / "red" / "00.png", hidden / "x.png")
    return n + 3


@pytest.mark.parametrize(("relpath", "kind"), [
    ("__MACOSX/red/._00.png", "__MACOSX"),
    ("red/._00.png", "._*"),
    ("red/.DS_Store", ".DS_Store"),
    ("red/Thumbs.db", "Thumbs.db"),
    ("red/THUMBS.DB", "THUMBS.DB"),
    ("desktop.ini", "desktop.ini"),
    ("red/.ipynb_checkpoints/00-checkpoint.png", ".ipynb_checkpoints"),
    ("a/b/c/.hidden.png", ".hidden.png"),
    ("red/00.png", None),
    ("red/my.photo.png", None),
    ("red/__init__.png", None),
])
def test_metadata_kind(relpath: str, kind: str | None):
    assert metadata_kind(relpath) == kind


def test_mac_zip_litter_is_neither_a_class_nor_an_image(tmp_path: Path, image_folder: Path):
    litter = add_mac_litter(image_folder)
    (image_folder / "red" / "notes.txt").write_text("shot on a sunny day")
    (image_folder / "blue" / "labels.csv").write_text("a,b\n")
    (image_folder / "green" / "README").write_text("no suffix")
    scan = scan_folder(image_folder)
    assert len(scan.items) == 36
    assert {it.label for it in scan.items} == set(COLOURS)
    assert scan.ignored.metadata.total() == litter
    assert scan.ignored.metadata["__MACOSX"] == 36 and scan.ignored.metadata["._*"] == 3
    assert dict(scan.ignored.not_images) == {".txt": 1, ".csv": 1, "no suffix": 1}

    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    rows = ingest.run(params)
    assert len(rows) == 36 and {r.label for r in rows} == set(COLOURS)
    assert not any("MACOSX" in r.relpath or "/." in r.relpath for r in rows)
    assert read_manifest(params.base.paths.manifest) == rows


def test_ingest_says_what_it_ignored_in_one_line(tmp_path: Path, image_folder: Path, capsys):
    litter = add_mac_litter(image_folder)
    (image_folder / "red" / "notes.txt").write_text("x")
    (image_folder / "blue" / "more.txt").write_text("x")
    (image_folder / "stray.png").write_bytes((image_folder / "red" / "00.png").read_bytes())
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    capsys.readouterr()
    ingest.run(params)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "ignored" in ln]
    assert lines == [
        f"ingest: ignored {litter} metadata files "
        "(__MACOSX, .DS_Store, ._*, .ipynb_checkpoints, ...), "
        "2 files that are not images (.txt), 1 file outside the class folders"
    ]


def test_nothing_ignored_prints_nothing(tmp_path: Path, image_folder: Path, capsys):
    ingest.run(make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)}))
    assert "ingest: ignored" not in capsys.readouterr().out


def test_split_layout_with_mac_litter(tmp_path: Path, image_folder: Path):
    root = tmp_path / "split"
    for split in ("train", "val"):
        shutil.copytree(image_folder, root / split)
    add_mac_litter(root / "train")  # __MACOSX inside train/: not a class
    (root / "__MACOSX" / "val").mkdir(parents=True)
    (root / "__MACOSX" / "val" / "._x.png").write_bytes(APPLEDOUBLE)
    (root / "readme.txt").write_text("beside the splits")
    scan = scan_folder(root)
    assert len(scan.items) == 72
    assert {it.label for it in scan.items} == set(COLOURS)
    assert scan.ignored.metadata["__MACOSX"] == 37
    assert scan.ignored.outside == 1


def test_a_class_of_litter_only_is_still_an_error(tmp_path: Path, image_folder: Path):
    empty = image_folder / "grey"
    empty.mkdir()
    (empty / "._a.png").write_bytes(APPLEDOUBLE)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(TlflowError, match=r"class folder .*grey holds no images"):
        scan_folder(image_folder)


def test_csv_rows_of_metadata_are_left_out_and_counted(tmp_path: Path, image_folder: Path):
    add_mac_litter(image_folder)
    lines = ["path,label"]
    for cls in COLOURS:
        lines += [f"{cls}/{i:02d}.png,{cls}" for i in range(12)]
        lines += [f"__MACOSX/{cls}/._00.png,{cls}", f"{cls}/._00.png,{cls}"]
    csv_path = image_folder / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    scan = scan_csv(csv_path)
    assert len(scan.items) == 36
    assert dict(scan.ignored.metadata) == {"__MACOSX": 3, "._*": 3}


def test_predict_listing_skips_metadata(image_folder: Path):
    add_mac_litter(image_folder)
    files = image_files(image_folder)
    assert len(files) == 36
    assert all(metadata_kind(f.relative_to(image_folder).as_posix()) is None for f in files)


# ---------------------------------------------------------------- any name the file system allows


def test_any_utf8_name_the_file_system_allows(tmp_path: Path, image_folder: Path):
    names = {
        "red": "é" * 124 + "abc.png",  # 255 bytes, the longest name ext4 allows
        "green": 'a "quoted", comma; name\nwith a newline.png',
        "blue": "ünïcödé 🐝 photo #1 (copy).png",
    }
    for cls, name in names.items():
        assert len(name.encode()) <= 255
        (image_folder / cls / name).write_bytes((image_folder / cls / "00.png").read_bytes())
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    rows = ingest.run(params)
    assert len(rows) == 39
    assert read_manifest(params.base.paths.manifest) == rows  # the CSV round-trips them
    for cls, name in names.items():
        row = next(r for r in rows if r.relpath == f"{cls}/{name}")
        assert row.label == cls
        assert (params.base.paths.images / row.relpath).read_bytes() == (
            image_folder / cls / name).read_bytes()
    assert ingest.run(params) == rows  # and a rerun finds the snapshot as it left it


def test_a_name_that_is_not_utf8_is_refused_before_anything_is_copied(
        tmp_path: Path, image_folder: Path):
    bad = os.fsdecode(b"caf\xe9.png")  # Latin-1, as old zips and Windows shares write names
    (image_folder / "red" / bad).write_bytes((image_folder / "red" / "00.png").read_bytes())
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    with pytest.raises(TlflowError) as err:
        ingest.run(params)
    message = str(err.value)
    assert "\n" not in message and "not valid UTF-8" in message
    assert r"red/caf\xe9.png" in message
    assert not params.base.paths.images.exists() or not any(params.base.paths.images.iterdir())
    assert not params.base.paths.manifest.exists()
    with pytest.raises(TlflowError, match="not valid UTF-8"):
        image_files(image_folder)  # predict's listing refuses it too


def test_ignored_files_may_have_any_name(tmp_path: Path, image_folder: Path):
    (image_folder / "red" / os.fsdecode(b"._caf\xe9.png")).write_bytes(APPLEDOUBLE)
    assert len(scan_folder(image_folder).items) == 36  # litter is not copied: no refusal


def test_a_csv_that_is_not_utf8_is_one_line(tmp_path: Path, image_folder: Path):
    csv_path = image_folder / "labels.csv"
    csv_path.write_bytes("path,label\nred/00.png,rouge café\n".encode("latin-1"))
    with pytest.raises(TlflowError, match=r"labels\.csv: not UTF-8 text"):
        scan_csv(csv_path)
    csv_path.write_bytes("path,label\nred/00.png,café\n".encode("utf-8-sig"))  # Excel's BOM
    assert [it.label for it in scan_csv(csv_path).items] == ["café"]


# ---------------------------------------------------------------- results never describe other data




# ---------------------------------------------------------------- nothing from outside the source


def _outside_image(tmp_path: Path, image_folder: Path) -> Path:
    """An image that is not part of the source (a private file elsewhere on the machine)."""
    secret = tmp_path / "elsewhere" / "private.png"
    secret.parent.mkdir()
    secret.write_bytes((image_folder / "red" / "00.png").read_bytes()[:-1] + b"\x01")
    return secret


@pytest.mark.parametrize("kind", ["file", "folder", "class folder", "broken"])
def test_a_symlink_in_a_folder_source_is_refused_in_one_line(tmp_path: Path, image_folder: Path,
                                                             kind: str):
    secret = _outside_image(tmp_path, image_folder)
    link = {"file": image_folder / "red" / "link.png",
            "folder": image_folder / "red" / "more",
            "class folder": image_folder / "grey",
            "broken": image_folder / "red" / "gone.png"}[kind]
    target = {"file": secret, "folder": secret.parent, "class folder": secret.parent,
              "broken": tmp_path / "nowhere.png"}[kind]
    link.symlink_to(target)
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)})
    with pytest.raises(TlflowError) as err:
        ingest.run(params)
    message = str(err.value)
    assert "\n" not in message and "symlink" in message and "OUTSIDE the source" in message
    assert str(link) in message and str(target.resolve()) in message  # the path, the target
    assert "ingest.follow_symlinks: true" in message
    assert not params.base.paths.manifest.exists()  # refused before anything is written
    assert not params.base.paths.images.exists() or not any(params.base.paths.images.iterdir())


def test_follow_symlinks_copies_what_they_point_to(tmp_path: Path, image_folder: Path):
    secret = _outside_image(tmp_path, image_folder)
    (image_folder / "red" / "link.png").symlink_to(secret)
    (image_folder / "blue" / "more").symlink_to(secret.parent)
    (image_folder / "blue" / "loop").symlink_to(image_folder / "blue")  # never walked twice
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder),
                                           "follow_symlinks": True})
    rows = ingest.run(params)
    assert len(rows) == 38
    copied = params.base.paths.images / "red" / "link.png"
    assert not copied.is_symlink() and copied.read_bytes() == secret.read_bytes()
    assert (params.base.paths.images / "blue" / "more" / "private.png").is_file()


def test_a_csv_row_through_a_symlink_is_refused(tmp_path: Path, image_folder: Path):
    secret = _outside_image(tmp_path, image_folder)
    (image_folder / "red" / "link.png").symlink_to(secret)
    csv_path = image_folder / "labels.csv"
    csv_path.write_text("path,label\nred/00.png,red\nred/link.png,red\n")
    with pytest.raises(TlflowError) as err:
        scan_csv(csv_path)
    assert "labels.csv:3: " in str(err.value) and str(secret) in str(err.value)
    assert "\n" not in str(err.value)
    assert len(scan_csv(csv_path, follow_symlinks=True).items) == 2


def test_a_symlink_inside_the_source_is_refused_too(tmp_path: Path, image_folder: Path):
    """A link to another image of the same source would duplicate it under two labels: it is
    named like any other (saying its target lies inside)."""
    (image_folder / "blue" / "red-copy.png").symlink_to(image_folder / "red" / "00.png")
    with pytest.raises(TlflowError, match=r"red-copy\.png is a symlink .* inside the source"):
        scan_folder(image_folder)
