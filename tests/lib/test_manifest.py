"""The manifest: its one reader and writer."""

from pathlib import Path

import pytest

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.data.manifest import Row, read_manifest, write_manifest


def test_manifest_missing(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"manifest.csv: not found \(written by the ingest stage"):
        read_manifest(tmp_path / "manifest.csv")


def test_round_trip_and_malformed_rows(tmp_path: Path):
    rows = [Row("a/1.png", "ab" * 32, "a", "train"), Row("b/2.png", "cd" * 32, "b", "test")]
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    assert read_manifest(path) == rows
    path.write_text("relpath,sha256,label,split\na/1.png,,a,train\n")
    with pytest.raises(TlflowError, match=r"manifest.csv: a row has no sha256"):
        read_manifest(path)
    path.write_text("path,label\nx.png,a\n")
    with pytest.raises(TlflowError, match=r"expected the columns .* \(written by the ingest"):
        read_manifest(path)
