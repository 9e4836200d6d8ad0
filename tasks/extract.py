"""Extract: turn every image of the manifest into CNN codes, cached in the HDF5 feature store.

Only the image hashes the store lacks are computed, every requested layer in one forward pass,
and rows are committed batch by batch: a killed run resumes from its last committed batch.
With `extract.executor: dask` the images are cut into shards computed on a Dask cluster and
committed here, shard by shard, as they arrive (tasks/lib/scale/sharding.py); a killed run also
keeps the shard files its workers finished.
`<features>/current.json` names the store the current params select, for the stages downstream;
the extract report lists how many codes were computed and which images could not be read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tlflow.tasks.lib.assess.compare import candidate_specs, cost
from tlflow.tasks.lib.core.device import resolve_device
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.extract import (
    Candidate,
    ExtractReport,
    Pointer,
    write_extract_metrics,
)
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.data import ownership
from tlflow.tasks.lib.data.decode import SIZE_SAMPLE, input_size_for
from tlflow.tasks.lib.data.manifest import Row, read_manifest
from tlflow.tasks.lib.features.backbones import Backbone, create_backbone
from tlflow.tasks.lib.features.codes import CodeExtractor
from tlflow.tasks.lib.features.extraction import (
    describe_extractor,
    fill,
    make_loader,
    missing_images,
)
from tlflow.tasks.lib.features.runtime import ORT, code_model, effective_runtime
from tlflow.tasks.lib.features.store import (
    FeatureStore,
    extractor_id,
    library_versions,
    store_path,
    writer_lock,
)
from tlflow.tasks.lib.scale.sharding import (
    ShardJob,
    clean_folder,
    commit_leftovers,
    extract_on_dask,
)

PARAMS = ("base.seed", "extract")  # what this stage reads besides base.paths (dvc.yaml: params)


def each_file(bad: list[dict[str, str]], rows: list[Row]) -> list[dict[str, str]]:
    """One entry per file (relpath) whose bytes could not be read, in manifest order: codes
    are computed once per content hash, but a person thinks in files, so every copy of an
    unreadable image (three empty files are one hash) is listed under its own name."""
    reasons = {b["sha256"]: (b["relpath"], b["reason"]) for b in bad}
    out = []
    for r in rows:
        if r.sha256 in reasons:
            first, reason = reasons[r.sha256]
            out.append({"relpath": r.relpath, "sha256": r.sha256,
                        "reason": reason.replace(first, r.relpath)})
    return out


@dataclass(frozen=True)
class Extracted:
    """One backbone's store after extract: where, what describes it, what was unreadable."""

    path: Path
    extractor: dict
    candidate: Candidate
    bad: list[dict[str, str]]
    size_why: str


def candidates(params: Params) -> list[tuple[str, str, Backbone]]:
    """(name, weights, backbone) of extract.backbone and of each extract.compare entry, all
    built before any code is computed: a candidate that cannot be built (unknown, weights
    not installed or not downloadable) stops the stage before it writes anything."""
    out = []
    for i, (name, weights) in enumerate(candidate_specs(params.extract)):
        try:
            out.append((name, weights, create_backbone(name, weights, None, params.base.seed)))
        except TlflowError as err:
            if i == 0:
                raise
            raise TlflowError(f"extract.compare: {name} (weights {weights}): {err}") from None
    return out


def extract_one(params: Params, rows: list[Row], device: torch.device, name: str,
                weights: str, backbone: Backbone, comparing: bool) -> Extracted:
    """Compute the codes one backbone's store lacks (resumable, batch by batch) and record
    the throughput; with `comparing`, also count its GFLOPs and parameters."""
    cfg, paths = params.extract, params.base.paths
    train = sorted((r for r in rows if r.split == "train"), key=lambda r: r.sha256)
    size, why = input_size_for(cfg.image_size, backbone.input_size,
                               [paths.images / r.relpath for r in train[:SIZE_SAMPLE]])
    backbone.resize(size)
    print(f"extract: {backbone.name}: input size {size} px ({why})", flush=True)
    extractor = describe_extractor(backbone.identity(), cfg, device)
    ext_id = extractor_id(extractor)
    model = CodeExtractor(backbone, cfg.layers)
    dims = model.dims(size)
    gflops, n_params = cost(backbone) if comparing else (None, None)
    path = store_path(paths.features, ext_id)
    with writer_lock(path, cfg.lock_timeout), \
            FeatureStore.create(path, extractor, dims, cfg.dtype) as store:
        store.check_whole()  # a damaged store is never a cache (Fletcher-32 on chunks)
        have = set(store.keys())
        resumed = commit_leftovers(store, ext_id, have)  # shard files a killed run finished
        if resumed:
            print(f"extract: committed {resumed} codes from finished shard files", flush=True)
        todo = missing_images(rows, have)
        n_images = len({r.sha256 for r in rows})  # a duplicate's code is computed once
        print(f"extract: {ext_id} ({backbone.name}) on {device}, {len(todo)} of {n_images} "
              f"images to compute ({len(rows)} files: a copy is computed once)", flush=True)
        bad, start = [], time.perf_counter()
        if todo and cfg.executor == "dask":
            if effective_runtime(cfg, device) == ORT:  # the graph into the cache once, not
                code_model(model, size, cfg, device)  # by each worker of a LocalCluster
            one = cfg.model_copy(update={"backbone": name, "weights": weights})
            job = ShardJob(ext_id, one, params.base.seed, size, library_versions(), (), (), "")
            bad = extract_on_dask(store, todo, paths.images, job)
        elif todo:
            loader = make_loader([paths.images / r.relpath for r in todo], backbone, cfg, device)
            bad = fill(store, code_model(model, size, cfg, device), todo, iter(loader), cfg,
                       device)
        unread = len({b["sha256"] for b in bad})
        store.record_throughput(len(todo) - unread, time.perf_counter() - start)
        clean_folder(path)
    print(f"extract: {len(todo) - unread} computed, {n_images - len(todo)} cached, "
          f"{len(bad)} image(s) skipped -> {path}", flush=True)
    candidate = Candidate(backbone=name, weights=weights, extractor_id=ext_id, input_size=size,
                          dims=dims, gflops=gflops, parameters=n_params)
    return Extracted(path, extractor, candidate, bad, why)


def run(params: Params) -> Path:
    """Compute the codes each candidate's store lacks (extract.backbone, then extract.compare);
    point `current.json` at extract.backbone's store, listing every candidate; write the
    report."""
    cfg, paths = params.extract, params.base.paths
    ownership.check_outputs("extract", paths)  # someone else's folder: refused first
    rows = read_manifest(paths.manifest)
    device = resolve_device(cfg.device)
    built = candidates(params)  # every backbone first: a bad candidate stops it here
    ownership.mark("features", paths.features)  # before anything is written, as ingest: a
    # killed run's shard files stay ours
    done = [extract_one(params, rows, device, name, weights, backbone, len(built) > 1)
            for name, weights, backbone in built]
    main = done[0]
    unreadable = {b["sha256"]: b for d in done for b in d.bad}  # the same files for each
    bad = each_file(list(unreadable.values()), rows)
    report = ExtractReport(extractor_id=main.candidate.extractor_id, images=len(rows),
                           bad_images=tuple(bad), image_size=main.candidate.input_size,
                           image_size_why=main.size_why)  # files, not hashes
    report.write(paths.extract_report)
    write_extract_metrics(paths.extract_metrics, report)
    Pointer(extractor_id=main.path.stem, store=main.path.name, extractor=main.extractor,
            candidates=tuple(d.candidate for d in done)).write_to(paths.features)
    return main.path
