"""`tlflow init`: a project of the user's own, in a folder of their choosing.

Like `dvc init` or `kedro new`, one command writes what a project is: params.yaml (every key
documented, the image source filled in, `base.project` from the folder's name), dvc.yaml,
artifacts.yaml (GTO), .gitignore, .dvcignore, a DVC default remote beside the folder, a short
README and the code stamp (tlflow-code.yaml); then `git init` (unless the folder is already
inside a git repository: then DVC's `--subdir` layout) and `dvc init`. No Python source is
copied: the stages are tlflow's installed code. Nothing is committed unless asked.

The files come from flows/templates/project/, and this repository's own params.yaml and
dvc.yaml are what `init_project` writes for it (tests/flows/test_project.py keeps them equal),
so the demo project and a user's project never drift.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import write_text
from tlflow.tasks.lib.core.gitrepo import GitRepo, toplevel
from tlflow.tasks.lib.core.params import project_slug

TEMPLATES = Path(__file__).parent / "templates" / "project"
# files a project is made of: refused when present, unless --force
OWN = ("params.yaml", "dvc.yaml", "artifacts.yaml")


@dataclass(frozen=True)
class Source:
    """Where the project's images come from: ingest.source and ingest.path."""

    kind: str  # digits | folder | csv
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "digits":
            return "scikit-learn's bundled 8x8 digits (1,797 images, written out as PNG files)"
        what = "class folders under" if self.kind == "folder" else "the CSV file"
        return f"{what} `{self.path}`"


def source_of(images: Path | None, csv: Path | None) -> Source:
    """The source the options name, checked: a folder of class folders, a CSV file, or the
    digits when neither is given. Raises TlflowError naming the option and the path."""
    if images is not None and csv is not None:
        raise TlflowError("tlflow init: give --images or --csv, not both")
    if images is not None:
        path = images.expanduser().resolve()
        if not path.is_dir():
            raise TlflowError(f"--images {images}: not a folder (expected one folder per "
                              "class of images, or train/val/test folders of them)")
        return Source("folder", path)
    if csv is not None:
        path = csv.expanduser().resolve()
        if not path.is_file():
            raise TlflowError(f"--csv {csv}: not a file (expected a CSV with columns "
                              "path,label[,split], paths relative to it)")
        return Source("csv", path)
    return Source("digits")


def _scalar(value: object) -> str:
    """A YAML scalar as it reads in flow style: null, a plain string, or a quoted one."""
    if value is None:
        return "null"
    # a plain scalar ends with the document-end marker "...", a quoted one does not
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...")


def _render(name: str, **values: object) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    return env.get_template(name).render(**values)


def render_params(project: str, source: Source) -> str:
    """params.yaml for a project: the template with base.project and the source filled in."""
    path = None if source.path is None else str(source.path)
    return _render("params.yaml.j2", project=_scalar(project), source=source.kind,
                   path=_scalar(path))


def render_dvc_yaml() -> str:
    """dvc.yaml, the same for every project (paths come from params.yaml). Its template is
    named dvc.yaml.j2 so that DVC does not take it for a pipeline of this repository."""
    return _render("dvc.yaml.j2")


def _merge_lines(path: Path, template: str) -> bool:
    """Add the template's lines that `path` lacks (a user's .gitignore is added to, never
    clobbered). Returns whether the file changed."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    have = {line.strip() for line in text.splitlines()}
    missing = [line for line in template.splitlines()
               if line.strip() and not line.startswith("#") and line.strip() not in have]
    if text and not missing:
        return False
    if not text:
        write_text(path, template)
        return True
    write_text(path, text + ("" if text.endswith("\n") else "\n")
               + "# tlflow\n" + "\n".join(missing) + "\n")
    return True


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC's INFO lines kept off stdout (stdout is for data: the project's path)."""
    import logging

    import dvc  # first: importing it sets up its logger, which would undo the level below

    log = logging.getLogger(dvc.__name__)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _dvc_init(root: Path, subdir: bool, remote: str) -> list[str]:
    """`dvc init` (with --subdir inside a larger git repository) unless .dvc exists, and a
    default remote when none is set. Returns what was done."""
    from dvc.config_schema import RelPath
    from dvc.repo import Repo

    done = []
    if not (root / ".dvc").is_dir():
        with _quiet_dvc():  # "Initialized DVC repository": our own line says it
            Repo.init(str(root), subdir=subdir).close()
        done.append("dvc init" + (" --subdir" if subdir else ""))
    with Repo(str(root)) as repo:
        core = repo.config.read("repo").get("core", {})
        if {"analytics", "check_update", "remote"} <= core.keys():
            return done  # a config of the user's own: left as it is, comments and all
    with Repo(str(root)) as repo, repo.config.edit("repo") as conf:
        conf.setdefault("core", {})
        conf["core"].setdefault("analytics", "false")  # nothing leaves the machine unasked
        conf["core"].setdefault("check_update", "false")
        if not conf["core"].get("remote"):
            conf.setdefault("remote", {})
            if "local" not in conf["remote"]:
                # a folder beside the project, written relative to .dvc/config. DVC takes a
                # plain relative str for one relative to the working directory: a RelPath of
                # the absolute path is what it writes as relative to the config's folder
                url = RelPath(os.path.abspath(root.parent / remote))
                conf["remote"]["local"] = {"url": url}
                done.append(f"DVC remote 'local' at ../{remote} (default)")
            conf["core"]["remote"] = "local"
    return done


def init_project(dest: Path, source: Source, force: bool = False,
                 commit: bool = False) -> list[str]:
    """Make `dest` a tlflow project (see the module's docstring). Returns what was done, one
    line each. Raises TlflowError, before writing anything, when dest holds params.yaml,
    dvc.yaml or artifacts.yaml (unless `force`) or is not a folder."""
    from tlflow.tasks.lib.core.codedeps import STAMP, refresh_stamp
    from tlflow.tasks.lib.core.params import Params
    from tlflow.tasks.lib.models.registry import write_index

    dest = dest.expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        raise TlflowError(f"{dest}: not a folder")
    if not force:
        for name in OWN:
            if (dest / name).exists():
                raise TlflowError(f"{dest / name}: already exists; tlflow init writes a new "
                                  "project (--force overwrites params.yaml, dvc.yaml and "
                                  "artifacts.yaml)")
    project = project_slug(dest.name)
    params_text = render_params(project, source)
    params = Params.model_validate(yaml.safe_load(params_text))  # validated before written
    top = toplevel(next(p for p in (dest, *dest.parents) if p.is_dir()))
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    if top is None:
        GitRepo.init(dest)
        done.append("git init")
    write_text(dest / "params.yaml", params_text)
    write_text(dest / "dvc.yaml", render_dvc_yaml())
    write_index(params.base.paths, dest)
    done.append("params.yaml, dvc.yaml, artifacts.yaml")
    for name, template in ((".gitignore", "gitignore"), (".dvcignore", "dvcignore")):
        if _merge_lines(dest / name, (TEMPLATES / template).read_text(encoding="utf-8")):
            done.append(name)
    remote = f"{project}-remote"
    if not (dest / "README.md").exists():
        write_text(dest / "README.md", _render("README.md.j2", project=project, remote=remote,
                                               source_text=source.describe()))
        done.append("README.md")
    done += _dvc_init(dest, subdir=top is not None and top != dest, remote=remote)
    refresh_stamp(dest)
    done.append(f"{STAMP} (the tlflow code each stage runs)")
    if commit:
        _commit(dest)
        done.append("git commit")
    return done


def _commit(root: Path) -> None:
    """Commit the project's files (only when asked: --commit)."""
    from tlflow.tasks.lib.core.codedeps import STAMP

    files = [*OWN, ".gitignore", ".dvcignore", "README.md", STAMP, ".dvc"]
    try:
        with GitRepo(root) as repo:
            repo.add_commit([f for f in files if (root / f).exists()], "tlflow init")
    except TlflowError as err:
        raise TlflowError(f"{err} (the project is written; commit it yourself)") from None
