"""`tlflow plots`: the project's DVC plots on one page that opens offline, with no npm.

DVC computes the plots, as `dvc plots show --json` does (in-process: DVC's own
`repo.plots.show` and its renderers): each plot's Vega-Lite spec with the data filled in, and
the image plots. vl-convert (the Vega and Vega-Lite JavaScript compiled into a Python wheel
with its own engine: no browser, no network) renders each spec to SVG, which the page inlines;
images become data URIs. The page holds no script at all, and its Content-Security-Policy
forbids any other source, as the HTML report's does: it opens from a copied folder, offline.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import write_text
from tlflow.tasks.lib.core.paths import Paths

# the image types DVC plots as pictures, by suffix (DVC's own data URIs say only "image")
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".gif": "image/gif", ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class Plot:
    """One of DVC's plots, drawn: `svg` (a Vega-Lite plot) or `image` (a data URI)."""

    name: str  # its id in dvc.yaml: a file path, or a top-level plot's title
    svg: str | None = None
    image: str | None = None


def show(root: Path = Path(), targets: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """What `dvc plots show --json` computes for the workspace, without its subprocess: one
    entry per plot, {"name", "type": "vega", "content": the filled Vega-Lite spec} or
    {"name", "type": "image", "url": a data URI}; and DVC's errors as one line each (a
    plot whose file is missing or has no rows is left out). Raises TlflowError when DVC
    cannot open the project."""
    from dvc.render.convert import to_json
    from dvc.render.match import match_defs_renderers

    from tlflow.flows.stages import dvc_repo

    with dvc_repo(root) as repo:
        data = repo.plots.show(targets=targets)
        found = match_defs_renderers(data=data, templates_dir=repo.plots.templates_dir)
    plots, errors = [], []
    for renderer, src_errors, def_errors in found:
        plots += [{"name": renderer.name, **entry} for entry in to_json(renderer)]
        errors += [f"{renderer.name}: {e}" for per_rev in src_errors.values()
                   for e in per_rev.values()]
        errors += [f"{renderer.name}: {e}" for e in def_errors.values()]
    return plots, errors


def to_svg(spec: dict[str, Any]) -> str:
    """A Vega-Lite spec drawn as SVG by vl-convert (Vega-Lite 5, DVC's templates' version).
    The first call in a process starts vl-convert's engine (about 1 s); later ones take about
    0.1 s each."""
    import vl_convert

    try:
        return vl_convert.vegalite_to_svg(spec)
    except ValueError as err:  # vl-convert's error for a spec it cannot compile
        raise TlflowError(f"vl-convert could not draw the plot {spec.get('title')!r}: "
                          f"{str(err).splitlines()[0]}") from None


def _image_uri(name: str, url: str) -> str:
    """DVC's `data:image;base64,...` with the media type of the file's suffix."""
    head, _, payload = url.partition(",")
    kind = _IMAGE_TYPES.get(Path(name).suffix.lower(), "image/png")
    return f"data:{kind};base64,{payload}" if head.endswith(";base64") else url


def drawn(root: Path = Path(), targets: list[str] | None = None) -> tuple[list[Plot], list[str]]:
    """The project's DVC plots drawn (SVG or image), in dvc.yaml's order; DVC's errors."""
    plots, errors = show(root, targets)
    out = []
    for p in plots:
        if p["type"] == "vega" and p.get("content"):
            out.append(Plot(p["name"], svg=to_svg(p["content"])))
        elif p["type"] == "image":
            url = p["url"]
            if not url.startswith("data:"):  # a path DVC wrote the image to
                url = "data:;base64," + base64.b64encode(Path(url).read_bytes()).decode()
            out.append(Plot(p["name"], image=_image_uri(p["name"], url)))
    return out, errors


def _template():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(("html", "j2")), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("plots.html.j2")


def write_page(paths: Paths, root: Path = Path()) -> tuple[Path, list[Plot], list[str]]:
    """Draw the DVC plots and write them to base.paths.plots_page (atomically); the page, the
    plots on it and DVC's errors (shown on the page too)."""
    from markupsafe import Markup

    plots, errors = drawn(root)
    html = _template().render(plots=[{"name": p.name, "image": p.image,
                                      "svg": Markup(p.svg) if p.svg else None} for p in plots],
                              errors=errors)
    write_text(paths.plots_page, html)
    return paths.plots_page, plots, errors
