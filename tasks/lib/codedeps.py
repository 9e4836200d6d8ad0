"""What each stage's code really is: the modules it imports, read from the source (AST).

dvc.yaml's code deps of a stage are exactly `code_deps("tasks.<stage>")`: its module and
every tlflow module it reaches through imports (at module level or inside functions), so
editing any of them makes DVC call the stage stale, and nothing else does. The fine-tune
checkpoint fingerprint hashes the same files. `python -m tasks.lib.codedeps` prints the
lists; `--write` puts them into dvc.yaml (tests/test_dvc_yaml.py fails when they drift).
Package `__init__.py` files hold only a docstring (tests/test_layout.py), so they are left out.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

PACKAGE = "tasks"
ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the tasks package


def module_path(module: str, root: Path = ROOT) -> Path | None:
    """The .py file of a tlflow module (None for a package or a module that does not exist)."""
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    return path if path.is_file() else None


def imports_of(path: Path) -> set[str]:
    """The tlflow modules one file imports, anywhere in it ("tasks.lib.x" form)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from tasks.lib import x` imports module tasks.lib.x
                sub = f"{node.module}.{alias.name}"
                out.add(sub if module_path(sub, _root_of(path)) else node.module)
    return {m for m in out if module_path(m, _root_of(path))}


def _root_of(path: Path) -> Path:
    """The folder holding the tasks package that `path` belongs to."""
    for parent in path.resolve().parents:
        if parent.name == PACKAGE:
            return parent.parent
    return ROOT


@functools.cache
def closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """The module and every tlflow module it reaches through imports, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        path = module_path(m, root)
        if path is not None:
            todo += sorted(imports_of(path) - seen)
    return tuple(sorted(seen))


def code_deps(stage: str, root: Path = ROOT) -> list[str]:
    """The files dvc.yaml lists as a stage's code deps (posix paths from the project root)."""
    own = f"{PACKAGE}.{stage}"
    mods = [own, *(m for m in closure(own, root) if m != own)]
    return [module_path(m, root).relative_to(root).as_posix()  # type: ignore[union-attr]
            for m in mods]


def write_dvc_yaml(dvc_yaml: Path, stages: list[str]) -> bool:
    """Replace each stage's `tasks/...` deps in dvc.yaml by its derived list (from the tasks
    package beside it), keeping every other line (comments included). Returns whether the
    file changed."""
    old = dvc_yaml.read_text()
    out: list[str] = []
    stage, written = None, set()
    for line in old.splitlines(keepends=True):
        stripped = line.strip()
        if (m := re.match(r"  (\w+):", line)) is not None:  # a stage's name under stages:
            stage = m.group(1)
        if stage in stages and stripped.startswith("- tasks/"):
            if stage not in written:
                indent = line[: len(line) - len(line.lstrip())]
                out += [f"{indent}- {d}\n" for d in code_deps(stage, dvc_yaml.parent)]
                written.add(stage)
            continue
        out.append(line)
    new = "".join(out)
    if new != old:
        dvc_yaml.write_text(new)
    return new != old


if __name__ == "__main__":
    names = ["ingest", "extract", "train", "finetune", "evaluate", "audit"]
    if "--write" in sys.argv:
        print("dvc.yaml", "updated" if write_dvc_yaml(ROOT / "dvc.yaml", names) else "unchanged")
    else:
        for name in names:
            print(f"{name}:", *code_deps(name), sep="\n  ")
