"""Atomic writes: any name the file system allows, and nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import TEMP_PREFIX, atomic_path, check_file_path, write_text


def longest_name(suffix: str = ".png") -> str:
    """A file name of exactly 255 bytes in UTF-8 (the ext4 / APFS / NTFS limit), non-ASCII."""
    name = "é" * ((255 - len(suffix)) // 2)
    name += "x" * (255 - len(suffix) - len(name.encode()))
    return name + suffix


def test_a_255_byte_name_is_written_through_a_short_temp_name(tmp_path: Path):
    name = longest_name()
    assert len(name.encode()) == 255
    dest = tmp_path / name
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX)
        assert len(tmp.name.encode()) < 32  # never derived from the destination's name
        tmp.write_bytes(b"picture")
    assert dest.read_bytes() == b"picture"
    assert os.listdir(tmp_path) == [name]


def test_a_failed_block_leaves_neither_dest_nor_temp(tmp_path: Path):
    dest = tmp_path / longest_name(".json")
    write_text(dest, "good")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert dest.read_text() == "good"
    assert os.listdir(tmp_path) == [dest.name]


def test_a_folder_where_a_file_goes_is_refused_before_the_work(tmp_path: Path):
    (tmp_path / "out.csv").mkdir()
    ran = []
    with pytest.raises(TlflowError, match=r"--out: .*out.csv: a folder where a file goes"):
        check_file_path(tmp_path / "out.csv", "--out")
    with pytest.raises(TlflowError, match="a folder where a file goes"), \
            atomic_path(tmp_path / "out.csv"):
        ran.append(1)
    assert not ran and (tmp_path / "out.csv").is_dir()  # the block never ran; nothing moved
    (tmp_path / "f").write_text("x")
    with pytest.raises(TlflowError, match=r"its folder .*f is a file\): a file where a folder"):
        check_file_path(tmp_path / "f" / "x.json")
    check_file_path(tmp_path / "new" / "x.json")  # not there yet: fine
