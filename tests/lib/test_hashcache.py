"""The stat cache of content hashes: unchanged files are not re-read; a corrupt cache is rebuilt."""

from pathlib import Path

from tests.conftest import COLOURS, write_image


def test_unchanged_files_are_not_reread(tmp_path: Path, image_folder: Path):
    """A file is read once to hash it and once more after it is copied (the copy is checked);
    a rerun over unchanged files reads none of them."""
    from tlflow.tasks.lib.data.hashcache import HashCache
    from tlflow.tasks.lib.data.snapshot import hash_items, snapshot
    from tlflow.tasks.lib.data.sources import folder_items

    images, cache_path = tmp_path / "images", tmp_path / "cache.sqlite"
    items = folder_items(image_folder)

    def ingest_once() -> tuple[dict[str, str], int]:
        with HashCache(cache_path) as cache:
            hashed = hash_items(items, cache)
            snapshot(hashed, images, cache)
            return {it.relpath: sha for it, sha in hashed}, cache.reads

    first, reads = ingest_once()
    assert reads == 2 * 36
    assert ingest_once() == (first, 0)  # stat only
    write_image(image_folder / "red" / "00.png", COLOURS["blue"], seed=7)  # new bytes
    again, reads = ingest_once()
    assert reads == 2 and again["red/00.png"] != first["red/00.png"]
    assert {k: v for k, v in again.items() if k != "red/00.png"} == {
        k: v for k, v in first.items() if k != "red/00.png"}


def test_a_corrupt_hash_cache_is_rebuilt(tmp_path: Path, image_folder: Path):
    from tlflow.tasks.lib.data.hashcache import HashCache

    cache_path = tmp_path / "cache.sqlite"
    cache_path.write_bytes(b"garbage" * 100)
    with HashCache(cache_path) as cache:
        assert len(cache.sha256(image_folder / "red" / "00.png")) == 64
