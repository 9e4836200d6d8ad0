"""The architecture, held by reading the imports (AST): a stage imports only the library,
the library never imports a stage, its wings import only the wings below them, there are no
import circles, package inits hold no code, and everything is imported under the one package
name, `tlflow`."""

import ast
from pathlib import Path

from tests.conftest import ROOT
from tlflow.tasks.lib.core.codedeps import imports_of

STAGE_MODULES = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__"}
LIB = ROOT / "tasks" / "lib"


def _module(path: Path) -> str:
    return ".".join(("tlflow", *path.relative_to(ROOT).with_suffix("").parts))


def _graph() -> dict[str, set[str]]:
    files = [p for p in (ROOT / "tasks").rglob("*.py") if p.name != "__init__.py"]
    return {_module(p): imports_of(p) for p in files}


def test_the_stages_and_commands_are_the_expected_ones():
    assert {"ingest", "extract", "train", "finetune", "evaluate", "audit", "predict",
                             "advise", "export"} == STAGE_MODULES


def test_a_stage_imports_only_the_library():
    for module, imports in _graph().items():
        if module.startswith("tlflow.tasks.lib."):
            continue
        other = {m for m in imports if not m.startswith("tlflow.tasks.lib.")}
        assert not other, f"{module} imports {sorted(other)}: stages import only tlflow.tasks.lib"


def test_the_library_never_imports_a_stage():
    for module, imports in _graph().items():
        if module.startswith("tlflow.tasks.lib."):
            stages = {m for m in imports if not m.startswith("tlflow.tasks.lib.")}
            assert not stages, f"{module} imports the stage(s) {sorted(stages)}"


# The library's wings (tasks/lib/<wing>/), from the ground up: a module imports only modules
# of its own wing and of the wings before it. Each wing's __init__ docstring says the same.
WINGS = ("core", "data", "features", "scale", "probe", "assess", "finetune", "models")


def _wing(module: str) -> str:
    return module.split(".")[3]


def test_every_library_module_lives_in_a_wing():
    assert sorted(p.name for p in LIB.glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(WINGS)
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((LIB / wing / "__init__.py").read_text()))
        assert doc and "Imports" in doc, f"{wing}/__init__.py: say what it owns and imports"


def test_the_wings_import_only_the_wings_below_them():
    for module, imports in _graph().items():
        if not module.startswith("tlflow.tasks.lib."):
            continue
        mine = WINGS.index(_wing(module))
        above = sorted(m for m in imports if m.startswith("tlflow.tasks.lib.")
                       and WINGS.index(_wing(m)) > mine)
        assert not above, f"{module} ({WINGS[mine]}) imports {above}, from a wing above it"


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_package_inits_hold_only_a_docstring():
    """codedeps leaves __init__.py files out of the code deps: they must not hold code."""
    for init in (ROOT / "tasks").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                   for n in body), init


def test_no_module_is_named_like_the_standard_library():
    import sys

    for path in (ROOT / "tasks").rglob("*.py"):
        assert path.stem not in sys.stdlib_module_names, path


def test_everything_is_imported_as_tlflow():
    """No module (tlflow's, the tests', the benches') imports `flows` or `tasks` by those
    names: they are folders of the repository, installed as tlflow.flows and tlflow.tasks."""
    for folder in ("tlflow", "flows", "tasks", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module
                         and node.level == 0 else [])
                top = {n.split(".")[0] for n in names}
                assert not top & {"flows", "tasks"}, f"{path}:{node.lineno} imports {names}"


def test_the_commands_are_one_table():
    """Each module of flows/commands/ (but base) is one command of the table, in --help in the
    table's order; the CLI dispatches through it (no if-chain on the command's name) and
    never patches argparse."""
    import argparse

    from tlflow.flows import cli

    modules = {p.stem for p in (ROOT / "flows" / "commands").glob("*.py")} - {"__init__", "base"}
    names = [c.name for c in cli.COMMANDS]
    assert sorted(names) == sorted(modules) and len(set(names)) == len(names)
    listed = next(a for a in cli.parser()._actions
                  if isinstance(a, argparse._SubParsersAction)).choices
    assert list(listed) == names
    source = (ROOT / "flows" / "cli.py").read_text()
    assert "args.command ==" not in source
    for path in (ROOT / "flows").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    assert not (isinstance(target, ast.Attribute)
                                and target.attr == "add_parser"), f"{path} patches argparse"


# The one door to git (tasks/lib/core/gitrepo.py): no other module runs a git process or opens a
# repository through a git library itself.
GIT_DOOR = "tlflow.tasks.lib.core.gitrepo"
GIT_LIBRARIES = ("pygit2", "dulwich", "git", "scmrepo.git")  # git = GitPython


def _runs_git(tree: ast.AST) -> bool:
    """A module that imports subprocess (or calls os.system/os.exec*/os.popen) and names the
    git executable: a string "git", or one starting "git ", anywhere in it."""
    def spawns_here(n: ast.AST) -> bool:
        if isinstance(n, ast.Import):
            return any(a.name == "subprocess" for a in n.names)
        if isinstance(n, ast.ImportFrom):
            return n.module == "subprocess"
        return (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == "os"
                and n.attr.startswith(("system", "exec", "popen", "spawn")))

    spawns = any(spawns_here(n) for n in ast.walk(tree))
    names_git = any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                    and (n.value == "git" or n.value.startswith("git "))
                    for n in ast.walk(tree))
    return spawns and names_git


def _opens_git(tree: ast.AST) -> set[str]:
    """The git libraries a module imports (scmrepo.exceptions, for GTO's errors, is fine)."""
    found = set()
    for n in ast.walk(tree):
        names = ([a.name for a in n.names] if isinstance(n, ast.Import)
                 else [n.module or ""] if isinstance(n, ast.ImportFrom) and not n.level
                 else [])
        found |= {m for m in names for lib in GIT_LIBRARIES if m == lib or
                  m.startswith(lib + ".")}
    return found


def test_git_is_read_and_written_through_one_module():
    assert _runs_git(ast.parse("import subprocess\nsubprocess.run(['git', 'log'])"))
    assert _opens_git(ast.parse("from dulwich.repo import Repo")) == {"dulwich.repo"}
    modules = {_module(p): p for folder in ("tlflow", "flows", "tasks")
               for p in (ROOT / folder).rglob("*.py")}
    assert GIT_DOOR in modules
    for module, path in sorted(modules.items()):
        if module == GIT_DOOR:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not _runs_git(tree), f"{module} runs git: go through {GIT_DOOR}"
        assert not _opens_git(tree), f"{module} imports {_opens_git(tree)}: go through {GIT_DOOR}"


# The fine-tuning library: data, optimizer and schedule, resume, the loop. The stage shell,
# tasks/finetune.py, does every read and write; these modules open no file and name no path.
FINETUNE_LIB = ("data", "optim", "resume", "loop")  # tasks/lib/finetune/
_FILE_MODULES = {"pathlib", "os", "shutil", "io", "csv", "tempfile", "h5py", "glob"} | {
    f"tlflow.tasks.lib.{m}" for m in ("core.files", "core.handoff", "core.checkpoint",
                                      "features.store", "core.codedeps", "data.decode",
                                      "data.manifest")}
_FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "unlink",
               "mkdir", "rmdir", "iterdir", "glob", "rglob", "touch", "exists", "is_file",
               "is_dir", "save_file", "load_file", "save_network", "load_network"}


def _touches_files(path: Path) -> list[str]:
    """Where a module imports a file-handling module, calls a file operation, or names
    params' paths (`.paths`, `paths.`), as `line: what`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        found += [f"{node.lineno}: import {n}" for n in names
                  if n in _FILE_MODULES or n.split(".")[0] in _FILE_MODULES
                  or n.startswith("tlflow.tasks.lib.core.handoff.")]  # any hand-off file
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in _FILE_CALLS:
                found.append(f"{node.lineno}: {name}()")
        if isinstance(node, ast.Attribute) and node.attr == "paths":
            found.append(f"{node.lineno}: .paths")
        if isinstance(node, ast.Name) and node.id == "paths":
            found.append(f"{node.lineno}: paths")
    return found


def test_the_finetune_library_opens_no_file_and_the_shell_does():
    for name in FINETUNE_LIB:
        path = LIB / "finetune" / f"{name}.py"
        assert not _touches_files(path), (name, _touches_files(path))
    shell = _touches_files(ROOT / "tasks" / "finetune.py")  # the check does see I/O
    assert any(s.endswith("()") for s in shell) and any("paths" in s for s in shell), shell
    lib_users = {m for m, imports in _graph().items() if not m.startswith("tlflow.tasks.lib.")
                 and imports & {f"tlflow.tasks.lib.finetune.{n}" for n in FINETUNE_LIB}}
    assert "tlflow.tasks.finetune" in lib_users


def test_the_readme_draws_the_wings_as_they_are():
    """README.md's table of the wings (Development) names each wing's modules: the picture of
    the house is checked against the files, as the import rules are."""
    import re

    rows = {m.group(1): set(re.findall(r"`(\w+)`", m.group(2))) for m in re.finditer(
        r"^\| `(\w+)` \| (.*) \|$", (ROOT / "README.md").read_text(), re.M)
        if m.group(1) in WINGS}
    assert list(rows) == list(WINGS)
    for wing, named in rows.items():
        here = {p.stem for p in (LIB / wing).glob("*.py")} - {"__init__"}
        here |= {p.name for p in (LIB / wing).iterdir() if (p / "__init__.py").is_file()}
        assert named == here, (f"README's {wing} row: lacks {sorted(here - named)}, names "
                               f"{sorted(named - here)} that are not there")
