"""Ingest: turn a source of labelled images into a snapshot under data/images and a manifest
(relpath under the snapshot, sha256 of the bytes, label, split). See tasks/lib/data/sources.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.data import ownership
from tlflow.tasks.lib.data.hashcache import HashCache
from tlflow.tasks.lib.data.manifest import SPLITS, Row, read_manifest, write_manifest
from tlflow.tasks.lib.data.snapshot import hash_items, snapshot
from tlflow.tasks.lib.data.sources import build_manifest, scan_source

PARAMS = ("base.seed", "ingest")  # what this stage reads besides base.paths (dvc.yaml: params)


def _written(manifest: Path) -> set[str]:
    """What the last ingest put under the snapshot folder: its manifest's relpaths (the
    record clean-up goes by; nothing else there is ever removed)."""
    try:
        return {r.relpath for r in read_manifest(manifest)}
    except TlflowError:  # no manifest yet, or a damaged one: remove nothing
        return set()


def run(params: Params) -> list[Row]:
    """Snapshot the source and write the manifest. The snapshot folder must be new, empty or
    tlflow's own (`ownership`); it is marked before the first file is copied into it."""
    paths = params.base.paths
    ownership.check_outputs("ingest", paths)
    scan = scan_source(params.ingest)
    if scan.ignored.summary():
        print(f"ingest: ignored {scan.ignored.summary()}", flush=True)
    items = scan.items
    with HashCache(paths.hash_cache) as cache:
        hashed = hash_items(items, cache)
        # validated before anything is written: a refused input leaves the last good run
        rows = build_manifest(hashed, params.ingest, params.base.seed)
        ownership.mark("images", paths.images)
        snapshot(hashed, paths.images, cache, _written(paths.manifest))
    write_manifest(rows, paths.manifest)
    counts = Counter(r.split for r in rows)
    print(f"ingest: {len(rows)} images, {len({r.label for r in rows})} classes "
          f"({', '.join(f'{s} {counts[s]}' for s in SPLITS)}) -> {paths.manifest}", flush=True)
    return rows
