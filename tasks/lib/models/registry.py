"""Which model serves: the promotion rule (a candidate replaces the serving model only if its
val accuracy is not worse by more than a margin, on comparable terms), and the model registry
that records the outcome: GTO's git tags (`probe@v0.0.2` registers a version, `probe#prod#2`
assigns it to a stage), read by `gto show` and by CI/CD.

A version is a git commit whose dvc.lock records the model; its files are read at that commit
through dvc.api (DVC's cache or remote), safetensors and JSON only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.gitrepo import GitRepo
from tlflow.tasks.lib.core.handoff.base import Record, problem
from tlflow.tasks.lib.core.paths import Paths
from tlflow.tasks.lib.models.exported import (
    MODELS,
    artifact,
    graph_files,
    promotion_terms,
    source_model,
)

# artifact name -> the base.paths key of its stem (<stem>.safetensors + <stem>.json): the
# models predict serves
ARTIFACTS = {"probe": "head", "finetuned": "finetuned"}
# the export stage's graphs (<base.paths.exported>/<model>.onnx + .json): registered and
# assigned like the models, never served by predict; a graph's val accuracy is its model's
EXPORTS = tuple(artifact(m) for m in MODELS)  # probe-onnx, finetuned-onnx
NAMES = (*ARTIFACTS, *EXPORTS)  # what `tlflow promote --model` takes
PROD = "prod"
INDEX = "artifacts.yaml"  # where GTO 1.x reads the artifacts' declarations (its config INDEX)
_DESCRIPTIONS = {"probe": "linear probe on the cached codes (tlflow stage train)",
                 "finetuned": "fine-tuned network (tlflow stage finetune)",
                 **{artifact(m): f"ONNX graph of the {m} model (tlflow stage export; "
                                 f"export.model: {m})" for m in MODELS}}


class Terms(Record):
    """What the promotion rule compares of a model version, from its sidecar at that commit
    (a probe's, a fine-tuned network's, or an exported graph's source model's)."""

    val_accuracy: float  # on the val split the model was chosen on
    extractor_id: str | None = None  # the codes it reads (None: a fine-tuned network's own)
    val_set: str | None = None  # the val split's identity (probes.val_set_id)
    classes: tuple[str, ...] | None = None


def promotion(current: Terms | None, candidate: Terms,
              margin: float | None) -> tuple[bool, str]:
    """Does the candidate replace the current model? Only if its val accuracy is not worse
    than the current one's by more than `margin`, when the two are comparable (same
    extractor, val split and classes); otherwise it is taken. Returns (yes?, why)."""
    if margin is None:
        return True, "promotion check off (train.promote_margin: null)"
    if current is None:
        return True, "no model serves yet"
    for key in ("extractor_id", "val_set", "classes"):
        if getattr(current, key) != getattr(candidate, key):
            return True, f"the serving model has other {key}: not comparable"
    new, old = candidate.val_accuracy, current.val_accuracy
    if new >= old - margin:
        return True, f"val accuracy {new:.4f} >= serving {old:.4f} - margin {margin:g}"
    return False, (f"val accuracy {new:.4f} < serving {old:.4f} - margin {margin:g}: "
                   "the serving model stays")


# --- the artifacts, as GTO reads them ------------------------------------------------------


def model_files(paths: Paths, name: str) -> tuple[str, str]:
    """The artifact's (tensors or graph, sidecar) paths, from base.paths."""
    if name not in NAMES:
        raise TlflowError(f"--model: unknown artifact {name!r}; artifacts: {list(NAMES)}")
    model = source_model(name)
    if model is not None:
        return tuple(f.as_posix() for f in graph_files(paths.exported, model))
    stem = getattr(paths, ARTIFACTS[name]).as_posix()
    return f"{stem}.safetensors", f"{stem}.json"


def artifacts_index(paths: Paths) -> dict[str, dict[str, Any]]:
    """artifacts.yaml as derived from base.paths: each artifact's tensors and sidecar."""
    index = {}
    for name in NAMES:
        tensors, sidecar = model_files(paths, name)
        index[name] = {"type": "model", "path": tensors, "description": _DESCRIPTIONS[name],
                       "custom": {"sidecar": sidecar}}
    return index


def write_index(paths: Paths, root: Path = Path()) -> Path:
    """Write artifacts.yaml from base.paths (`python -m tlflow.tasks.lib.models.registry
    --write`)."""
    dest = root / INDEX
    dest.write_text("# GTO's artifacts, derived from params.yaml base.paths: regenerate with\n"
                    "# `python -m tlflow.tasks.lib.models.registry --write`; tests check it.\n"
                    + yaml.safe_dump(artifacts_index(paths), sort_keys=False))
    return dest


# --- git, DVC and GTO ----------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """A registered version of an artifact and the commit it names."""

    artifact: str
    version: str
    rev: str  # commit hexsha
    assigned_at: datetime | None = None  # when it was assigned to the stage asked about

    def label(self) -> str:
        """e.g. "probe v0.0.2 (1a2b3c4)"."""
        return f"{self.artifact} {self.version} ({self.rev[:7]})"


@dataclass(frozen=True)
class Outcome:
    """What `promote` did: the version now serving (None if none) and why."""

    promoted: bool
    serving: Version | None
    why: str


def head_rev(root: Path) -> str:
    """HEAD's commit; an error when root is not a git repo with a commit."""
    try:
        repo = GitRepo(root)
    except TlflowError:
        raise TlflowError(f"{root.resolve()}: not a git repo; the registry is git tags "
                          "(`git init`, commit the run, then promote)") from None
    with repo:
        rev = repo.head()
    if rev is None:
        raise TlflowError(f"{root.resolve()}: no commit yet; commit the run (`git add "
                          "dvc.lock ... && git commit`), then promote")
    return rev


def check_committed(root: Path, paths: Paths, name: str) -> None:
    """dvc.lock as committed at HEAD, the model's files as dvc.lock records them (in the cache)."""
    from dvc.repo import Repo

    with GitRepo(root) as repo:
        lock_changed = repo.changed("dvc.lock")
    if lock_changed:
        raise TlflowError("dvc.lock: differs from HEAD (or is not committed); commit the run "
                          "(`git add dvc.lock ... && git commit`), then promote")
    files = model_files(paths, name)
    with Repo(str(root)) as repo:
        report = repo.status(targets=[str(root.resolve() / f) for f in files])
    changed = {path: why for changes in report.values() for change in changes
               if isinstance(change, dict)
               for path, why in change.get("changed outs", {}).items()}
    if changed:
        path, why = next(iter(changed.items()))
        raise TlflowError(f"{path}: {why} since dvc.lock at HEAD; `dvc commit` and git "
                          "commit the run, then promote")


def read_at(root: Path, path: str, rev: str, binary: bool = False) -> str | bytes:
    """A DVC-tracked file as of `rev` (DVC's cache, or the remote)."""
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(root), rev=rev, mode="rb" if binary else "r")
    except Exception as err:  # DVC's errors for a missing cache entry or an unknown path vary
        raise TlflowError(f"{path} at {rev[:7]}: cannot read it through DVC "
                          f"({type(err).__name__}: {err}); `dvc pull` it?") from None


def sidecar_at(root: Path, paths: Paths, name: str, rev: str) -> Terms:
    """The artifact's JSON sidecar at `rev` (for an exported graph, the promotion terms of
    its model: tasks/lib/models/exported.promotion_terms); an error when it holds no trained
    model or no exported graph."""
    path = model_files(paths, name)[1]
    try:
        meta = json.loads(read_at(root, path, rev))
    except json.JSONDecodeError as err:
        raise TlflowError(f"{path} at {rev[:7]}: not valid JSON: {err}") from None
    model = source_model(name)
    if model is not None:
        terms = promotion_terms(meta) if isinstance(meta, dict) else None
        if terms is None:
            raise TlflowError(f"{path} at {rev[:7]}: no exported {model} graph (set "
                              f"export.enabled: true and export.model: {model}, then "
                              "`tlflow run` and commit the run)")
        meta = terms
    elif not isinstance(meta, dict) or meta.get("enabled") is False \
            or "val_accuracy" not in meta:
        raise TlflowError(f"{path} at {rev[:7]}: no trained {name} model (no val_accuracy; "
                          "for finetuned, finetune.enabled: true)")
    try:
        return Terms.model_validate(meta)
    except ValidationError as err:
        raise TlflowError(f"{path} at {rev[:7]}: not a model's sidecar ({problem(err)})") \
            from None


def fetch_model(root: Path, paths: Paths, version: Version, dest: Path) -> Path:
    """Copy the version's tensors and sidecar into dest; returns the stem to load from."""
    tensors, sidecar = model_files(paths, version.artifact)
    stem = dest / Path(tensors).stem
    Path(f"{stem}.safetensors").write_bytes(read_at(root, tensors, version.rev, binary=True))
    Path(f"{stem}.json").write_bytes(read_at(root, sidecar, version.rev, binary=True))
    return stem


def _gto_call(what: str, call, *args, **kwargs):
    """A gto.api call; GTO's own errors become one line."""
    from gto.exceptions import GTOException

    try:
        return call(*args, **kwargs)
    except GTOException as err:
        raise TlflowError(f"gto {what}: {err}") from None


def _versions(root: Path, name: str) -> list[dict[str, Any]]:
    """`gto show NAME`'s rows (newest first); [] when the artifact has no tags yet."""
    import gto.api
    from gto.exceptions import ArtifactNotFound, GTOException, NoRepo
    from scmrepo.exceptions import SCMError

    try:
        return gto.api.show(str(root), name)
    except (ArtifactNotFound, NoRepo, SCMError):  # no tags for it yet; no git repo
        return []
    except GTOException as err:
        raise TlflowError(f"gto show {name}: {err}") from None


def serving(root: Path, name: str, stage: str = PROD) -> Version | None:
    """The version `gto show` lists in the stage (the latest assignment), or None."""
    for v in _versions(root, name):
        for s in v["stages"]:
            if s["stage"] == stage:
                return Version(name, v["version"], v["commit_hexsha"], s["activated_at"])
    return None


def check_declared(root: Path, paths: Paths, name: str, rev: str) -> None:
    """artifacts.yaml at rev declares the artifact at base.paths' tensors path."""
    import gto.api

    want = model_files(paths, name)[0]
    with GitRepo(root) as repo:
        committed = repo.exists_at(rev, INDEX)
    if not committed:
        raise TlflowError(f"{INDEX}: not committed at HEAD; run `python -m "
                          f"tlflow.tasks.lib.models.registry --write` (it declares {name} at "
                          f"{want}) and commit {INDEX}")
    art = _gto_call("describe", gto.api.describe, str(root), name, rev=rev)
    if art is None or art.path != want:
        found = "not declared" if art is None else f"declared at {art.path}"
        raise TlflowError(f"{INDEX}: {name} {found} at HEAD, expected path {want} (from "
                          f"params.yaml base.paths); run `python -m "
                          f"tlflow.tasks.lib.models.registry --write` and commit {INDEX}")


def _after_last_tag(root: Path) -> None:
    """GTO orders events by their tags' time, to the second: never share the last one's."""
    with GitRepo(root) as repo:
        last = repo.last_tag_time()
    if last is not None:
        time.sleep(max(0.0, last + 1 - time.time()))


def _register_and_assign(root: Path, name: str, rev: str, stage: str) -> str:
    """`gto register` the commit (unless it is a registered version already), `gto assign` it."""
    import gto.api

    _after_last_tag(root)
    version = next((v["version"] for v in _versions(root, name)
                    if v["commit_hexsha"] == rev and v["registrations"]), None)
    if version is None:
        version = _gto_call("register", gto.api.register, str(root), name, rev,
                            message=f"tlflow promote: {name} at {rev[:7]}").version
    _gto_call("assign", gto.api.assign, str(root), name, stage, version=version, force=True,
              message=f"tlflow promote: {name} {version} to {stage}")
    return version


def promote(root: Path, paths: Paths, margin: float | None, name: str = "probe",
            stage: str = PROD, force: bool = False) -> Outcome:
    """Register HEAD's model and assign it to the stage if the rule (or --force) says so."""
    rev = head_rev(root)
    check_committed(root, paths, name)
    check_declared(root, paths, name, rev)
    candidate = sidecar_at(root, paths, name, rev)
    current = serving(root, name, stage)
    if current is not None and current.rev == rev:
        return Outcome(False, current, f"HEAD is already in {stage}")
    old = sidecar_at(root, paths, name, current.rev) if current else None
    yes, why = promotion(old, candidate, margin)
    if not yes and not force:
        return Outcome(False, current, why)
    version = _register_and_assign(root, name, rev, stage)
    if not yes:
        why = f"forced (--force); the rule said {why}"
    return Outcome(True, Version(name, version, rev), why)


def describe(outcome: Outcome, stage: str = PROD) -> str:
    """The one line `tlflow promote` prints."""
    s = outcome.serving
    if outcome.promoted and s is not None:
        return f"promoted {s.label()} to {stage}: {outcome.why}"
    serves = f"{s.label()} stays in {stage}" if s else f"nothing is in {stage}"
    return f"not promoted: {outcome.why}; {serves}"


def promoted(root: Path, stage: str = PROD) -> Version | None:
    """The model that serves: of the artifacts with a version in the stage, the one assigned
    last; None outside a git repo or when none is. GTO (0.1 s to import) is asked only about
    an artifact some tag assigns to a stage (GTO names those NAME#STAGE...)."""
    try:
        with GitRepo(root) as repo:
            tags = repo.tags()
    except TlflowError:
        return None
    found = []
    for name in ARTIFACTS:
        if not any(t.startswith(f"{name}#") for t in tags):
            continue  # never assigned: gto would list no stage for it
        try:
            v = serving(root, name, stage)
        except TlflowError:
            v = None
        if v is not None:
            found.append(v)
    return max(found, key=lambda v: v.assigned_at, default=None)


if __name__ == "__main__":
    import sys

    from tlflow.tasks.lib.core.params import load_params

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tlflow.tasks.lib.models.registry --write  (artifacts.yaml from "
                 "params.yaml)")
    print(write_index(load_params().base.paths))
