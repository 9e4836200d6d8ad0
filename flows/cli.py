"""The `tlflow` command. It works on the project in the current directory.

Conventions: data (predictions, JSON, tables, status) go to stdout, messages (notes,
progress, errors) to stderr; expected failures exit 2 with one line; `status -q` exits 1 when
a stage is stale; a closed pipe (`tlflow predict data/images | head -2`) ends quietly with
exit 141, the status of a command killed by SIGPIPE (128 + 13), as `cat` or `yes` give.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tlflow import __version__
from tlflow.tasks.lib import interrupts
from tlflow.tasks.lib.errors import TlflowError

# Prefect warns at import when it cannot create PREFECT_HOME; a run that needs it says so in
# one line naming the variable and the fix (flows/tempserver.check_home)
warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory",
                        category=UserWarning)

if TYPE_CHECKING:
    from tlflow.tasks.lib.params import Params


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for `yes | head -1`'s yes


def _described(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Subcommands whose --help opens with a description: their help, as a sentence, unless
    they give their own."""
    add = sub.add_parser

    def add_parser(name: str, **kwargs: object) -> argparse.ArgumentParser:
        text = str(kwargs.get("help") or "")
        kwargs.setdefault("description", text[:1].upper() + text[1:] + "." if text else None)
        return add(name, **kwargs)

    sub.add_parser = add_parser
    return sub


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlflow", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = _described(p.add_subparsers(dest="command", required=True))
    ini = sub.add_parser("init", help="make a folder a tlflow project of your own (params.yaml, "
                                      "dvc.yaml, git and DVC)",
                         description="Make DIR (default: here) a tlflow project: params.yaml "
                                     "(every key documented, the source filled in), dvc.yaml, "
                                     "artifacts.yaml, .gitignore, .dvcignore, a DVC default "
                                     "remote beside DIR, a README; then `git init` (or DVC's "
                                     "--subdir layout inside a git repository) and `dvc "
                                     "init`. No code is copied; nothing is committed unless "
                                     "--commit. Then: cd DIR && tlflow run.")
    ini.add_argument("dir", nargs="?", type=Path, default=Path(), help="the project folder")
    src = ini.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, metavar="FOLDER",
                     help="images in one folder per class (or train/val/test folders of them)")
    src.add_argument("--csv", type=Path, metavar="FILE",
                     help="a CSV of path,label[,split] (paths relative to it)")
    ini.add_argument("--force", action="store_true",
                     help="overwrite an existing params.yaml, dvc.yaml and artifacts.yaml")
    ini.add_argument("--commit", action="store_true", help="git commit the project's files")
    r = sub.add_parser("run", help="run the pipeline as a Prefect flow (only stale stages)")
    r.add_argument("--force", action="store_true", help="rerun every stage")
    st = sub.add_parser("status", help="each stage: up to date, or stale and why (dvc status)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("-q", "--quiet", action="store_true",
                    help="print nothing; exit 1 when a stage is stale, 0 when all are up to "
                         "date (as `dvc status -q`)")
    h = sub.add_parser("history", help="one line per versioned run (git's history of dvc.lock)",
                       description="One line per versioned run (each commit of dvc.lock): "
                                   "when (ISO 8601 with the zone), git revision, data version "
                                   "(DVC's md5 of the manifest) and images added / removed, "
                                   "extractor, model, probe and fine-tuned test accuracy, GTO "
                                   "versions and stages at that commit, params that changed.")
    h.add_argument("--json", action="store_true", help="print JSON (one record per run)")
    sv = sub.add_parser("serve", help="serve the pipeline flow on a schedule (Prefect)")
    _schedule_args(sv, required=True)
    dp = sub.add_parser("deploy", help="create a deployment on a Prefect work pool")
    dp.add_argument("--pool", required=True, help="the work pool's name")
    _schedule_args(dp, required=False)
    s = sub.add_parser("stage", help="run one stage (the stage's cmd in dvc.yaml)")
    s.add_argument("name", help="ingest | extract | train | finetune | evaluate | audit")
    pr = sub.add_parser("predict", help="label images with the trained head")
    pr.add_argument("target", type=Path, help="an image or a folder of images")
    pr.add_argument("--top-k", type=int, default=1, help="how many labels per image")
    pr.add_argument("--out", type=Path, help="also write the predictions to this CSV")
    pr.add_argument("--strict", action="store_true",
                    help="fail (exit 2) on the first unreadable image instead of skipping it")
    pr.add_argument("--min-confidence", type=float, metavar="P",
                    help="label an image `unsure` when its calibrated top probability is "
                         "below P (default predict.min_confidence)")
    pr.add_argument("--model", choices=("promoted", "probe", "finetuned"), default="promoted",
                    help="the version in prod (default; the working tree's probe when none "
                         "is), or the working tree's probe or fine-tuned network")
    ex = sub.add_parser("export", help="write the served model as one ONNX graph (backbone "
                                       "and head) plus a JSON sidecar; needs tlflow[zoo]",
                        description="Write the model predict would serve (--model) as one "
                                    "ONNX graph, backbone and head together: a preprocessed "
                                    "float32 batch (N, 3, H, W) in, class probabilities out, "
                                    "in <out>/<artifact>.onnx, and a JSON sidecar beside it "
                                    "(classes, preprocessing, the model's version and sha256). "
                                    "Prints the graph's path. Needs pip install 'tlflow[zoo]'.")
    ex.add_argument("--model", choices=("promoted", "probe", "finetuned"), default="promoted",
                    help="the version in prod (default; the working tree's probe when none "
                         "is), or the working tree's probe or fine-tuned network")
    ex.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the only one)")
    ex.add_argument("--out", type=Path, help="the folder (default base.paths.export)")
    pm = sub.add_parser("promote", help="register HEAD's model with GTO and assign it to a "
                                        "stage, unless it is worse than the one serving")
    pm.add_argument("--model", choices=("probe", "finetuned"), default="probe",
                    help="which artifact (default probe)")
    pm.add_argument("--force", action="store_true", help="promote even when the rule says no")
    pm.add_argument("--stage", default="prod", help="the GTO stage (default prod)")
    rp = sub.add_parser("report", help="write the offline HTML report (base.paths.report) "
                                       "from the last run's outputs; no stage runs",
                        description="Write the offline HTML report (base.paths.report, "
                                    "thumbnails beside it) from what the last run wrote: test "
                                    "metrics against the run committed at git HEAD (or "
                                    "--against REV) and what changed since it (per class, per "
                                    "image, the data), per-class table, confusion matrices, "
                                    "the fine-tuning curve, the "
                                    "advice, the misclassified test images, near-duplicates "
                                    "across splits and likely label errors. Prints its path.")
    rp.add_argument("--open", action="store_true", help="also open it in the web browser")
    rp.add_argument("--against", metavar="REV", help="show what changed since the run "
                    "committed at this git revision (default HEAD)")
    cp = sub.add_parser("compare", help="the backbones of extract.compare, measured: one "
                                        "row each, the winner marked (the last run's)")
    cp.add_argument("--json", action="store_true", help="reports/compare.json as it is")
    pl = sub.add_parser("plots", help="draw the project's DVC plots to one page that opens "
                                      "offline (base.paths.plots_page); no stage runs",
                        description="Draw what `dvc plots show` computes from the workspace "
                                    "(the filled Vega-Lite specs and the images) to SVG with "
                                    "vl-convert, on one page (base.paths.plots_page) that "
                                    "needs no network, no npm and no script. Prints its path.")
    pl.add_argument("--open", action="store_true", help="also open it in the web browser")
    a = sub.add_parser("advise", help="place the data set in the 2x2 table and name the plan")
    a.add_argument("--json", action="store_true", help="print JSON")
    f = sub.add_parser("features", help="inspect or prune the feature stores")
    fsub = _described(f.add_subparsers(dest="action", required=True))
    i = fsub.add_parser("info", help="a store's extractor, rows, layers and dims")
    i.add_argument("store", nargs="?", help="an .h5 file (default: the current store)")
    i.add_argument("--json", action="store_true", help="print JSON")
    v = fsub.add_parser("verify", help="read every chunk of a store and check its checksum")
    v.add_argument("store", nargs="?", help="an .h5 file (default: the current store)")
    g = fsub.add_parser("gc", help="prune rows that the manifest no longer references")
    g.add_argument("--dry-run", action="store_true", help="only count what would go")
    return p


def _schedule_args(p: argparse.ArgumentParser, required: bool) -> None:
    when = p.add_mutually_exclusive_group(required=required)
    when.add_argument("--cron", help="a cron expression, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, help="seconds between runs")
    p.add_argument("--name", help="the deployment's name (default: base.project)")


def _check_project() -> Params:
    """Bad params and a missing DVC project stop here, before Prefect starts."""
    from tlflow.tasks.lib.params import load_params

    params = load_params()
    for needed in (".dvc", "dvc.yaml"):
        if not Path(needed).exists():
            raise TlflowError(f"{needed}: not found; tlflow needs a DVC project (`tlflow "
                              "init` makes this folder one)")
    return params


def cmd_status(as_json: bool, quiet: bool = False) -> int:
    """Each stage: up to date, or stale and why; the same answer as `dvc status`. Quiet, only
    the exit status: 1 when a stage is stale."""
    from tlflow.flows.stages import status

    _check_project()
    report = status()
    if quiet:
        return 1 if any(report.values()) else 0
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(map(len, report))
    for name, why in report.items():
        print(f"{name:<{width}}  {'up to date' if why is None else 'stale: ' + why}")
    return 0


def cmd_serve(cron: str | None, interval: float | None, name: str | None) -> int:
    """Serve the flow in this process; each scheduled run takes the data source as it is."""
    name = name or _check_project().base.project
    from tlflow.flows.pipeline import pipeline
    from tlflow.flows.tempserver import prefect_api

    # limit=1: runs of one project never overlap (they share its files and dvc.lock)
    interrupts.doing("serve")
    try:
        with prefect_api():
            try:
                pipeline.serve(name=name, cron=cron, interval=interval, limit=1)
            finally:  # Prefect's runner pauses its deployment on the way out; make sure
                _clear_schedule(name)
    except (ValueError, TypeError) as err:  # e.g. a cron expression Prefect cannot parse
        raise TlflowError(f"tlflow serve: {err}") from None
    interrupts.check()  # Prefect's serve returns quietly on Ctrl-C: exit 130 all the same
    return 0


def _clear_schedule(name: str) -> None:
    """Pause the served deployment (`tlflow-pipeline/<name>`) and delete its runs still
    Scheduled: nobody serves them now, and they would clutter the UI. Prefect 3's serve does
    the same on a clean shutdown (pause_on_shutdown; pausing deletes auto-scheduled runs);
    this also covers runs scheduled by hand. Starting `tlflow serve` again resumes the same
    deployment."""
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"tlflow-pipeline/{name}")
        client.pause_deployment(deployment.id)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        for run in runs:
            client.delete_flow_run(run.id)


def cmd_deploy(pool: str, cron: str | None, interval: float | None, name: str | None) -> int:
    """Register a deployment of this project's flow on a work pool (workers run it here)."""
    name = name or _check_project().base.project
    from tlflow.flows.pipeline import pipeline

    source = pipeline.from_source(source=str(Path.cwd()),
                                  entrypoint="tlflow.flows.pipeline.pipeline")
    try:
        deployment = source.deploy(name=name, work_pool_name=pool, cron=cron,
                                   interval=interval, concurrency_limit=1,
                                   print_next_steps=False)
    except Exception as err:  # Prefect's errors: no server, unknown pool...
        raise TlflowError(f"tlflow deploy: {type(err).__name__}: {err}") from None
    print(f"deployment tlflow-pipeline/{name} ({deployment}) on work pool {pool!r}; start a "
          f"worker with `prefect worker start --pool {pool}`")
    return 0


def cmd_init(dest: Path, images: Path | None, csv: Path | None, force: bool,
             commit: bool) -> int:
    """Write a project of the user's own; what was done on stderr, its path on stdout."""
    from tlflow.flows.project import init_project, source_of

    done = init_project(dest, source_of(images, csv), force=force, commit=commit)
    for line in done:
        print(f"init: {line}", file=sys.stderr)
    where = dest.expanduser().resolve()
    step = "" if where == Path.cwd().resolve() else f"cd {dest} && "
    print(f"init: next: {step}tlflow run", file=sys.stderr)
    print(where)
    return 0


def cmd_stage(name: str) -> int:
    """Run one stage in this process (what `dvc repro` runs): the code stamp is refreshed
    first, so dvc.lock records the code that ran."""
    from tlflow.flows.stages import stage_runner
    from tlflow.tasks.lib.codedeps import refresh_stamp
    from tlflow.tasks.lib.params import load_params

    runner = stage_runner(name)
    interrupts.doing(name)
    refresh_stamp()
    runner(load_params())
    return 0


def cmd_promote(model: str, force: bool, stage: str) -> int:
    """Compare HEAD's model with the one in the stage; register and assign it if promoted."""
    from tlflow.tasks.lib import registry
    from tlflow.tasks.lib.params import load_params

    params = load_params()
    outcome = registry.promote(Path(), params.base.paths, params.train.promote_margin, model,
                               stage, force)
    print(registry.describe(outcome, stage))
    return 0


def bring_up_to_date(names: Sequence[str], params: Params, who: str) -> None:
    """Run those of the stages `who` reads that are stale, in order, and record them in
    dvc.lock, as `dvc repro` (and `tlflow run`) would: a folder or CSV source is rescanned
    (DVC cannot see it), and what follows reruns only if what it reads changed. Their output
    goes to stderr, so stdout keeps only `who`'s answer. Outside a DVC project nothing can be
    checked: one line on stderr says so."""
    if not Path(".dvc").is_dir():
        print(f"{who}: no DVC project here (.dvc), so whether {', '.join(names)} are up to date "
              "is not known; the answer describes the data they last ran on", file=sys.stderr)
        return
    import contextlib

    from tlflow.flows.stages import commit, rescanned, stage_runner, why_stale

    for name in names:
        reason = why_stale(name) or rescanned(name, params)
        if reason is None:
            continue
        print(f"{who}: bringing {name} up to date first ({reason})", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # the stage's own lines
            stage_runner(name)(params)
        commit(name)

def warn_if_stale(names: Sequence[str], who: str) -> None:
    """Say on stderr which of these stages DVC calls stale: what `who` reports then describes
    their last run, not the data and params as they are now. Silent outside a DVC project."""
    if not Path(".dvc").is_dir():
        return
    from tlflow.flows.stages import status

    try:
        report = status()
    except TlflowError as err:  # e.g. no git: freshness cannot be told
        print(f"{who}: whether {', '.join(names)} are up to date is not known ({err})",
              file=sys.stderr)
        return
    for name in names:
        if report.get(name):
            print(f"{who}: stage {name} is stale ({report[name]}): this describes its last "
                  "run; `tlflow run` brings it up to date", file=sys.stderr)


def _open(page: Path) -> None:
    """Open a written page in the web browser (`--open`)."""
    import webbrowser

    webbrowser.open(page.resolve().as_uri())


def cmd_report(open_it: bool, against: str | None = None) -> int:
    """Write the HTML report from the outputs on disk; its path on stdout, counts on stderr."""
    from tlflow.flows.html_report import write_report
    from tlflow.flows.stages import STAGES
    from tlflow.tasks.lib.params import load_params

    paths = load_params().base.paths
    written = write_report(paths, against=against)
    warn_if_stale(STAGES, "report")
    wrong = ", ".join(f"{m} {n} wrong" for m, n in written.misclassified.items())
    print(f"report: {wrong or 'no predictions'}; {written.near_duplicates} near-duplicate "
          f"pair(s), {written.label_issues} likely label error(s); {written.thumbnails} "
          "thumbnails", file=sys.stderr)
    print(written.page)
    if open_it:
        _open(written.page)
    return 0


def cmd_compare(as_json: bool) -> int:
    """Print the last run's comparison of backbones (reports/compare.json): a table on
    stdout, or the file's JSON; a line saying how to ask for one when none ran."""
    from tlflow.tasks.lib.compare import format_table
    from tlflow.tasks.lib.handoff import read_compare_report
    from tlflow.tasks.lib.params import load_params

    paths = load_params().base.paths
    warn_if_stale(("ingest", "extract", "train"), "compare")
    rep = read_compare_report(paths.compare_report)
    if as_json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    elif not rep["compared"]:
        print("compare: no comparison ran; list backbones in params.yaml extract.compare, "
              "e.g. [timm/tf_efficientnet_lite1, timm/tf_efficientnet_lite2], and run "
              "`tlflow run`", file=sys.stderr)
    else:
        print(format_table(rep))
    return 0


def cmd_plots(open_it: bool) -> int:
    """Write the DVC plots page; its path on stdout, what it holds on stderr."""
    from tlflow.flows.dvc_plots import write_page

    page, plots, errors = write_page(_check_project().base.paths)
    for line in errors:
        print(f"plots: dvc: {line}", file=sys.stderr)
    print(f"plots: {len(plots)} plot(s): {', '.join(p.name for p in plots) or 'none'}",
          file=sys.stderr)
    print(page)
    if open_it:
        _open(page)
    return 0


def cmd_advise(as_json: bool) -> int:
    """Measure size and similarity now (from the manifest, the sweep and the store), after
    bringing ingest, extract and train up to date: never the decision for other data."""
    from tlflow.tasks import advise
    from tlflow.tasks.lib.advice import table
    from tlflow.tasks.lib.params import load_params, scoped

    params = load_params()
    bring_up_to_date(("ingest", "extract", "train"), params, "advise")
    decision = advise.run(scoped(params, advise.PARAMS))
    if as_json:
        print(json.dumps(decision, indent=2, sort_keys=True))
    else:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(table(decision)))
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """`tlflow features info|gc`."""
    from tlflow.tasks.lib.featurestore import info
    from tlflow.tasks.lib.handoff import current_store
    from tlflow.tasks.lib.params import load_params

    params = load_params()
    if args.action == "verify":
        from tlflow.tasks.lib.featurestore import FeatureStore

        store = Path(args.store) if args.store else current_store(params.base.paths.features)
        interrupts.doing("features verify")
        with FeatureStore(store) as fs:
            fs.check_whole()
        print(f"{store}: every chunk passes its checksum", file=sys.stderr)
        return 0
    if args.action == "info":
        if not args.store:
            warn_if_stale(("ingest", "extract"), "features info")
        store = Path(args.store) if args.store else current_store(params.base.paths.features)
        facts = info(store)
        if args.json:
            print(json.dumps(facts, indent=2, sort_keys=True))
        else:
            _print_info(facts)
        return 0
    return _gc(params, args.dry_run)


def _print_info(facts: dict) -> None:
    print(f"store:     {facts['store']} ({facts['bytes'] / 2**20:.1f} MiB)")
    print(f"rows:      {facts['rows']}")
    for name, dim in facts["layers"].items():
        print(f"layer:     {name} ({dim})")
    print(f"extractor: {json.dumps(facts['extractor'], sort_keys=True)}")
    print(f"versions:  {json.dumps(facts['versions'], sort_keys=True)}")


def _gc(params: Params, dry_run: bool) -> int:
    """Prune the stores; record the result in dvc.lock when extract was up to date before."""
    from tlflow.tasks.lib.featurestore import gc
    from tlflow.tasks.lib.manifest import read_manifest

    in_dvc = Path(".dvc").is_dir()
    if in_dvc:
        from tlflow.flows.stages import commit, why_stale

        was_fresh = why_stale("extract") is None
    paths = params.base.paths
    from tlflow.tasks.lib import ownership

    # gc rewrites every store in the folder: it must be tlflow's (marked, or only its stores)
    ownership.check("features", paths.features, ownership.recognised("features"))
    keep = {r.sha256 for r in read_manifest(paths.manifest)}
    for store, kept, removed in gc(paths.features, keep, params.extract.lock_timeout, dry_run):
        verb = "would remove" if dry_run else "removed"
        print(f"{store}: kept {kept} rows, {verb} {removed}")
    if in_dvc and was_fresh and not dry_run:
        commit("extract")
    return 0


def cmd_run(force: bool) -> int:
    """Run the flow; print which stages ran and the metrics."""
    params = _check_project()
    from tlflow.flows.pipeline import BAD_INPUT, pipeline
    from tlflow.flows.tempserver import prefect_api

    with prefect_api():  # no PREFECT_API_URL: a temporary server that dies with this process
        try:
            state = pipeline(force=force, return_state=True)
            interrupts.check()  # a signal that came as the run ended
        except BaseException:
            if interrupts.received() is not None:  # whatever it broke on the way
                _cancelled(interrupts.describe())
                raise interrupts.Interrupted(interrupts.received()) from None
            raise
        if state.is_failed():
            print(f"error: {state.message}", file=sys.stderr)
            return 2 if state.name == BAD_INPUT else 1
        _summary(state.result(), params)
    return 0


def _cancelled(line: str) -> None:
    """Mark the interrupted flow run Cancelled while its API is still up (quietly: the
    interrupted line is what the user reads)."""
    import contextlib

    from tlflow.flows.pipeline import mark_cancelled

    with contextlib.suppress(Exception):
        mark_cancelled(line.removeprefix("interrupted: "))


def _summary(results: list, params: Params) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tlflow run")
    for col in ("stage", "ran", "why", "seconds"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, "ran" if r.ran else "skipped", r.reason, f"{r.seconds:.1f}")
    console = Console(soft_wrap=True)  # a line is never broken inside, piped or not
    console.print(table)
    from tlflow.tasks.lib.handoff import read_eval_metrics, read_probe_report

    paths = params.base.paths
    if not (paths.eval_metrics.is_file() and paths.probe_report.is_file()):
        return
    probe = read_probe_report(paths.probe_report)
    sweep = Table(title="layer sweep (val)")
    for col in ("layer", "dim", "best C", "val accuracy"):
        sweep.add_column(col)
    for r in probe["layers"]:
        sweep.add_row(r["layer"], str(r["dim"]), f"{r['C']:g}", f"{r['val_accuracy']:.4f}")
    console.print(sweep)
    metrics = read_eval_metrics(paths.eval_metrics)
    best, test = probe["best"], metrics["probe"]
    console.print(
        f"probe: {best['classifier']} on layer {best['layer']}, C={best['C']:g}, "
        f"val accuracy {best['val_accuracy']:.4f}, test accuracy {test['accuracy']:.4f}, "
        f"macro F1 {test['macro_f1']:.4f}"
    )
    if "finetune" in metrics:
        from tlflow.tasks.lib.network import read_meta

        meta, ft = read_meta(paths.finetuned), metrics["finetune"]
        console.print(
            f"fine-tuned: {meta.get('trainable')}, best epoch {meta.get('best_epoch')}, val "
            f"accuracy {meta.get('val_accuracy', float('nan')):.4f}, test accuracy "
            f"{ft['accuracy']:.4f}, macro F1 {ft['macro_f1']:.4f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: expected failures print one line and exit 2, without a traceback."""
    args = _parser().parse_args(argv)
    interrupts.install()
    # The temporary server Prefect starts for a run sends usage telemetry; offline (this
    # project's premise) each attempt logs an ERROR that makes a clean run look failed. A
    # user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        if args.command == "init":
            return cmd_init(args.dir, args.images, args.csv, args.force, args.commit)
        if args.command == "stage":
            return cmd_stage(args.name)
        if args.command == "features":
            return cmd_features(args)
        if args.command == "advise":
            return cmd_advise(args.json)
        if args.command == "compare":
            return cmd_compare(args.json)
        if args.command == "report":
            return cmd_report(args.open, args.against)
        if args.command == "plots":
            return cmd_plots(args.open)
        if args.command == "status":
            return cmd_status(args.json, args.quiet)
        if args.command == "history":
            from tlflow.flows import history
            from tlflow.tasks.lib.params import load_params

            print("\n".join(history.run(load_params(), args.json)))
            return 0
        if args.command == "serve":
            return cmd_serve(args.cron, args.interval, args.name)
        if args.command == "deploy":
            return cmd_deploy(args.pool, args.cron, args.interval, args.name)
        if args.command == "promote":
            return cmd_promote(args.model, args.force, args.stage)
        if args.command == "export":
            from tlflow.tasks import export
            from tlflow.tasks.lib.params import load_params, scoped

            export.check_ready(args.format)
            if args.model != "promoted":  # as predict: the working tree's model may be stale
                warn_if_stale(("extract", "train")
                              + (("finetune",) if args.model == "finetuned" else ()), "export")
            export.run(scoped(load_params(), export.PARAMS), args.model, args.format, args.out)
            return 0
        if args.command == "predict":
            from tlflow.tasks import predict
            from tlflow.tasks.lib.params import load_params, scoped

            if args.model != "promoted":  # a promoted model is a committed version
                warn_if_stale(("ingest", "extract", "train")
                              + (("finetune",) if args.model == "finetuned" else ()), "predict")
            interrupts.doing("predict")
            predict.run(scoped(load_params(), predict.PARAMS), args.target, args.top_k,
                        args.out, args.model, args.strict, args.min_confidence)
            return 0
        return cmd_run(args.force)
    except KeyboardInterrupt as err:
        return _interrupted(err)
    except TlflowError as err:
        if interrupts.received() is not None:  # a child stopped by the same signal
            return _interrupted(err)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # the machine's limits (a full disk...): one line, else a bug
        from tlflow.tasks.lib.errors import environment_error

        if interrupts.received() is not None:  # e.g. a DataLoader worker killed by it
            return _interrupted(err)
        env = environment_error(err)
        if env is None:
            raise
        print(f"error: {env}", file=sys.stderr)
        return env.exit_code


def _interrupted(err: BaseException) -> int:
    """The one line of an interrupted command; 128 + the signal (130 for a plain
    KeyboardInterrupt)."""
    print(interrupts.describe(), file=sys.stderr, flush=True)
    signum = interrupts.received()
    return 128 + signum if signum is not None else 130


def console() -> None:
    """Console-script wrapper: exit with main's status. A reader that closes the pipe early
    (`| head`) ends the command quietly, as Python's documentation advises for SIGPIPE:
    stdout is pointed at devnull so the final flush cannot fail again, and the exit status is
    the shell's for a command killed by SIGPIPE."""
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


if __name__ == "__main__":
    console()
