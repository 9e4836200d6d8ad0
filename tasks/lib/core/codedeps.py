"""What each stage's code really is, and the stamp that lets DVC see it.

A stage's code is its module and every tlflow module it reaches through imports (at module
level or inside functions), read from the source (AST). In a user's project that code is the
installed tlflow package, not files of the project, so dvc.yaml cannot list it as deps.
Instead tlflow writes STAMP (tlflow-code.yaml, beside dvc.yaml) before DVC reads the
pipeline: for each stage the sha256 of its modules and the tlflow version that code came
with. Each stage in dvc.yaml lists its own entry as a param (`- tlflow-code.yaml: [extract]`),
so DVC calls a stage stale exactly when the code it runs changed: an upgrade whose decoding
changed reruns extract and what follows, one that changed only the probe reruns train onward,
the same code reruns nothing. In this repository the same stamp covers edits to the source.

`python -m tlflow.tasks.lib.core.codedeps` prints each stage's modules; `--write` refreshes the
stamp. Package `__init__.py` files hold only a docstring (tests/test_layout.py), so they are
left out.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

PACKAGE = "tlflow"
STAMP = "tlflow-code.yaml"  # the stamp's file name, in the project root beside dvc.yaml
STAGES = ("ingest", "extract", "train", "finetune", "evaluate", "audit", "export")
_HEADER = (
    "# Written by tlflow before DVC reads the pipeline (tlflow run, status, stage, ...): for\n"
    "# each stage, the sha256 of the tlflow modules it runs and the version that code came\n"
    "# with. dvc.yaml lists each stage's entry as a param, so a stage reruns when its code\n"
    "# changed (an upgrade of tlflow, or an edit of its source). Commit it with dvc.lock.\n")


def package_dirs() -> dict[str, Path]:
    """Where the import package's parts lie on disk: {"tlflow.tasks": .../tasks, ...}, for an
    editable install (the repository's folders) and a wheel (site-packages/tlflow/...)."""
    import tlflow
    import tlflow.flows
    import tlflow.tasks

    return {m.__name__: Path(m.__file__).parent for m in (tlflow, tlflow.flows, tlflow.tasks)}


def source_dirs(root: Path) -> dict[str, Path]:
    """The same map for a source tree laid out as this repository is (tlflow/, flows/,
    tasks/ under root): for reading a tree that is not the installed one."""
    return {PACKAGE: root / "tlflow", f"{PACKAGE}.flows": root / "flows",
            f"{PACKAGE}.tasks": root / "tasks"}


def module_path(module: str, dirs: Mapping[str, Path] | None = None) -> Path | None:
    """The .py file of a tlflow module (None for a package or a module that does not exist)."""
    dirs = package_dirs() if dirs is None else dirs
    base = max((p for p in dirs if module == p or module.startswith(p + ".")), key=len,
               default=None)
    if base is None:
        return None
    rest = module[len(base):].lstrip(".").split(".") if module != base else []
    if not rest:
        return None  # a package: its __init__ holds only a docstring
    path = dirs[base].joinpath(*rest).with_suffix(".py")
    return path if path.is_file() else None


def imports_of(path: Path, dirs: Mapping[str, Path] | None = None) -> set[str]:
    """The tlflow modules one file imports, anywhere in it ("tlflow.tasks.lib.x" form)."""
    dirs = package_dirs() if dirs is None else dirs
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from tlflow.tasks.lib import x` imports module x
                sub = f"{node.module}.{alias.name}"
                out.add(sub if module_path(sub, dirs) else node.module)
    return {m for m in out if module_path(m, dirs)}


def closure(module: str, dirs: Mapping[str, Path] | None = None) -> tuple[str, ...]:
    """The module and every tlflow module it reaches through imports, sorted."""
    return _closure(module, tuple(sorted((dirs or package_dirs()).items())))


@functools.cache
def _closure(module: str, dirs: tuple[tuple[str, Path], ...]) -> tuple[str, ...]:
    where = dict(dirs)
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        path = module_path(m, where)
        if path is not None:
            todo += sorted(imports_of(path, where) - seen)
    return tuple(sorted(m for m in seen if module_path(m, where)))


def stage_modules(stage: str, dirs: Mapping[str, Path] | None = None) -> tuple[str, ...]:
    """The modules a stage runs: tlflow.tasks.<stage> and all it imports."""
    return closure(f"{PACKAGE}.tasks.{stage}", dirs)


def code_hash(stage: str, dirs: Mapping[str, Path] | None = None) -> str:
    """sha256 of a stage's code: each module's name and bytes, in name order (hex)."""
    dirs = package_dirs() if dirs is None else dirs
    digest = hashlib.sha256()
    for module in stage_modules(stage, dirs):
        data = module_path(module, dirs).read_bytes()  # type: ignore[union-attr]
        digest.update(f"{module}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def stamp(old: Mapping[str, Mapping[str, str]] | None = None,
          dirs: Mapping[str, Path] | None = None) -> dict[str, dict[str, str]]:
    """The stamp for the code installed now: {stage: {"sha256", "version"}}. A stage whose
    code is what `old` records keeps old's entry (its version with it): a release that did
    not change a stage's code leaves that stage up to date."""
    from tlflow import __version__

    dirs = package_dirs() if dirs is None else dirs
    old = old or {}
    out = {}
    for stage in STAGES:
        digest = code_hash(stage, dirs)
        was = old.get(stage) or {}
        out[stage] = dict(was) if was.get("sha256") == digest else {
            "sha256": digest, "version": __version__}
    return out


def read_stamp(path: Path) -> dict[str, dict[str, str]]:
    """The stamp file's entries ({} when absent or not a mapping: it is rewritten whole)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}


def refresh_stamp(root: Path = Path()) -> bool:
    """Bring root/STAMP up to date with the installed code, atomically, if root holds a
    dvc.yaml; touched only when an entry changed. Returns whether it was written."""
    from tlflow.tasks.lib.core.files import atomic_path

    if not (root / "dvc.yaml").is_file():
        return False
    path = root / STAMP
    old = read_stamp(path)
    new = stamp(old)
    if new == old and path.is_file():
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(_HEADER + yaml.safe_dump(new, sort_keys=True), encoding="utf-8")
    return True


def describe_change(stage: str, was: Mapping[str, str] | None,
                    now: Mapping[str, str] | None) -> str:
    """Why a stage's code entry differs, for `tlflow status`: "tlflow's extract code changed
    (0.1.0 → 0.2.0)", or the hashes' first digits when the version is the same (a source
    edit)."""
    was, now = was or {}, now or {}
    if not was:
        return f"tlflow's {stage} code: not recorded yet"
    if was.get("version") != now.get("version"):
        return f"tlflow's {stage} code changed ({was.get('version')} → {now.get('version')})"
    return (f"tlflow's {stage} code changed ({now.get('version')}, edited: "
            f"{str(was.get('sha256'))[:8]} → {str(now.get('sha256'))[:8]})")


if __name__ == "__main__":
    if "--write" in sys.argv:
        print(STAMP, "updated" if refresh_stamp() else "unchanged")
    else:
        for name in STAGES:
            print(f"{name}: {code_hash(name)[:12]}", *stage_modules(name), sep="\n  ")
