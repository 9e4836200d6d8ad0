"""A run's new images against the probe that served before it: how many look unlike the
training set (issue 24, drift).

New images are the manifest's image hashes after ingest that the previous run's manifest
lacked (extract's unreadable ones left out). They are judged by the probe on disk before
the run's train stage replaces it, i.e. the model that was serving when they arrived: its
novelty check (tasks/lib/probe/novelty.py: the k-th nearest training code's distance in the
probe's normalized space, beyond the threshold that flags 1% of val) on the codes extract
has just computed for them. A first run, or one that brings no new image, has nothing to
judge and writes nothing.

Why the flow and not a stage: a stage that read the head it is about to replace would make
DVC's graph lie (train's output would be its own input), and the judgement belongs to a run
(what arrived since the previous one), not to the data or the params DVC hashes. So the flow
does it between extract and train, as a Prefect task of its own ("new images", in
flows/pipeline.py), and records
it in base.paths.new_images (report/, not versioned), which the run summary, `tlflow run`'s
output and the HTML report read. `dvc repro` judges nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import sha256_file
from tlflow.tasks.lib.core.handoff.extract import ExtractReport
from tlflow.tasks.lib.core.handoff.flow import NewImage, NewImages
from tlflow.tasks.lib.core.paths import Paths
from tlflow.tasks.lib.data.manifest import Row, read_manifest, without

MAX_LISTED = 100  # novel images kept in the file and shown in the report, farthest first
WHAT = "novel: k-NN distance beyond the val threshold"


def new_rows(paths: Paths, before: frozenset[str]) -> list[Row]:
    """The manifest's rows whose image hash is not in `before` (the previous run's hashes),
    one per hash, in manifest order, less the images extract could not read. [] when
    `before` is empty (a first run: nothing is new against nothing)."""
    if not before or not paths.manifest.is_file():
        return []
    bad = ExtractReport.read(paths.extract_report).bad if paths.extract_report.is_file() \
        else {}
    out, seen = [], set(before)
    for r in without(read_manifest(paths.manifest), bad):
        if r.sha256 not in seen:
            seen.add(r.sha256)
            out.append(r)
    return out


def to_judge(paths: Paths, before: frozenset[str]) -> list[Row]:
    """`new_rows`, or [] when there is no previous probe to judge them by (no head at
    base.paths.head: a first run, or one whose train never ran)."""
    from tlflow.tasks.lib.probe.head import tensors_path

    return new_rows(paths, before) if tensors_path(paths.head).is_file() else []


def judge(paths: Paths, new: list[Row]) -> NewImages:
    """The new images (rows with codes in the store) judged by the probe at base.paths.head:
    the novel ones farthest first (at most MAX_LISTED), or why they cannot be judged: no
    readable probe, no novelty reference in it, or its extractor's codes not computed for
    them (extract's params changed since). Never raises TlflowError."""
    from tlflow.tasks.lib.features.store import FeatureStore, store_path
    from tlflow.tasks.lib.probe import trust
    from tlflow.tasks.lib.probe.head import load_head

    base = {"new": len(new), "novel": None, "max_listed": MAX_LISTED,
            "manifest_sha256": sha256_file(paths.manifest)}
    try:
        head = load_head(paths.head)
    except TlflowError as err:
        return NewImages(**base, reason=f"the previous probe could not be read ({err})")
    ext, layer = head.meta.extractor_id, head.meta.layer
    base |= {"extractor_id": ext, "layer": layer}
    if not trust.has_novelty(head):
        return NewImages(**base, reason="the previous probe carries no novelty reference "
                                        "(trained before tlflow recorded one)")
    store = store_path(paths.features, str(ext))
    why = (f"the previous probe reads layer {layer} of extractor {ext}, whose codes this run "
           "did not compute for them (extract's params changed)")
    try:
        with FeatureStore(store) as s:
            if layer not in s.layers or not {r.sha256 for r in new} <= set(s.keys()):
                return NewImages(**base, reason=why)
            codes = s.read(str(layer), [r.sha256 for r in new])
    except (TlflowError, OSError) as err:
        return NewImages(**base, reason=why if not store.is_file() else f"{why}: {err}")
    distance, novel = trust.novel_codes(head, codes)
    farthest = sorted(np.flatnonzero(novel), key=lambda i: (-distance[i], new[i].relpath))
    images = tuple(NewImage(relpath=new[i].relpath, sha256=new[i].sha256,
                            label=new[i].label, split=new[i].split,
                            distance=round(float(distance[i]), 6))
                   for i in farthest[:MAX_LISTED])
    nov = head.meta.novelty
    return NewImages(**base | {"novel": int(novel.sum())}, k=nov.k,
                     threshold=nov.threshold, images=images)


def line(report: NewImages) -> str:
    """The run summary's line, e.g. "new images: 12 of 40 look unlike the training set
    (novel: k-NN distance beyond the val threshold)", or why they were not judged."""
    if not report.judged:
        return f"new images: {report.new}, not judged: {report.reason}"
    verb = "looks" if report.new == 1 else "look"
    return f"new images: {report.novel} of {report.new} {verb} unlike the training set ({WHAT})"


def this_run(paths: Paths) -> NewImages | None:
    """What the last `tlflow run` judged of its new images, when the manifest is still the
    one it judged (None: nothing judged, or the data changed since)."""
    if not paths.new_images.is_file() or not paths.manifest.is_file():
        return None
    report = NewImages.read(paths.new_images)
    return report if report.manifest_sha256 == sha256_file(paths.manifest) else None


def forget(paths: Paths) -> None:
    """Remove the previous run's judgement: a run says only what it judged itself."""
    Path(paths.new_images).unlink(missing_ok=True)


def record(paths: Paths, new: list[Row]) -> NewImages:
    """Judge the run's new images by the previous probe (`judge`) and write
    base.paths.new_images."""
    report = judge(paths, new)
    report.write(paths.new_images)
    return report
