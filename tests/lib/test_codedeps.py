"""The import graph read from the source: what a stage's code deps are."""

from pathlib import Path

from tasks.lib.codedeps import closure, code_deps, imports_of, write_dvc_yaml


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_imports_anywhere_in_a_module_count(tmp_path: Path):
    root = _package(tmp_path, {
        "tasks/__init__.py": '"""doc"""\n',
        "tasks/lib/__init__.py": '"""doc"""\n',
        "tasks/lib/a.py": "import os\n",
        "tasks/lib/b.py": "from tasks.lib import a\n",
        "tasks/lib/c.py": "def f():\n    from tasks.lib.b import x\n",
        "tasks/stage.py": "import tasks.lib.c\nfrom tasks.lib.nothere import y\n",
    })
    assert imports_of(root / "tasks/lib/b.py") == {"tasks.lib.a"}
    assert imports_of(root / "tasks/lib/c.py") == {"tasks.lib.b"}  # inside a function too
    assert closure("tasks.stage", root) == ("tasks.lib.a", "tasks.lib.b", "tasks.lib.c",
                                            "tasks.stage")
    assert code_deps("stage", root) == ["tasks/stage.py", "tasks/lib/a.py", "tasks/lib/b.py",
                                        "tasks/lib/c.py"]


def test_write_replaces_only_the_code_deps(tmp_path: Path):
    root = _package(tmp_path, {
        "tasks/__init__.py": "", "tasks/lib/__init__.py": "", "tasks/lib/a.py": "",
        "tasks/one.py": "from tasks.lib import a\n",
    })
    dvc_yaml = root / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  one:   # a comment\n    cmd: x\n    deps:\n"
                        "      - tasks/one.py\n      - tasks/old.py\n      - data/x\n")
    assert write_dvc_yaml(dvc_yaml, ["one"])
    assert not write_dvc_yaml(dvc_yaml, ["one"])  # a second write changes nothing
    assert dvc_yaml.read_text() == ("stages:\n  one:   # a comment\n    cmd: x\n    deps:\n"
                                    "      - tasks/one.py\n      - tasks/lib/a.py\n"
                                    "      - data/x\n")
