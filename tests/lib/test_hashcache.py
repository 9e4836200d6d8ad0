"""The stat cache of content hashes: unchanged files are not re-read; a corrupt cache is rebuilt."""

from pathlib import Path

from tests.conftest import COLOURS, write_image


def test_unchanged_files_are_not_reread(tmp_path: Path, image_folder: Path):
    from tasks.lib.hashcache import HashCache
    from tasks.lib.sources import folder_items, snapshot

    images, cache_path = tmp_path / "images", tmp_path / "cache.sqlite"
    items = folder_items(image_folder)
    with HashCache(cache_path) as cache:
        first = snapshot(items, images, cache)
        assert cache.reads == 36
    with HashCache(cache_path) as cache:
        assert snapshot(items, images, cache) == first
        assert cache.reads == 0  # stat only
    write_image(image_folder / "red" / "00.png", COLOURS["blue"], seed=7)  # new bytes
    with HashCache(cache_path) as cache:
        again = dict((it.relpath, sha) for it, sha in snapshot(items, images, cache))
        assert cache.reads == 1
    assert again["red/00.png"] != dict((it.relpath, s) for it, s in first)["red/00.png"]


def test_a_corrupt_hash_cache_is_rebuilt(tmp_path: Path, image_folder: Path):
    from tasks.lib.hashcache import HashCache

    cache_path = tmp_path / "cache.sqlite"
    cache_path.write_bytes(b"garbage" * 100)
    with HashCache(cache_path) as cache:
        assert len(cache.sha256(image_folder / "red" / "00.png")) == 64
