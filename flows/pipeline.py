"""The Prefect flow: ingest -> extract -> train -> evaluate, rerunning only stale stages.

Freshness has one source of truth: DVC's dvc.lock. A stage runs in-process when `dvc status`
calls it stale, then `dvc commit` records it, so `dvc repro` and `tlflow run` agree.

In Prefect's UI a stage that was up to date ends in a Completed state named "Skipped" (as
Prefect names a cache hit "Cached"), its reason as the state's message; a stage that ran ends
"Completed". Each flow run is named and tagged after the project (`project:<base.project>`,
so projects sharing one server keep apart) and tagged with the git revision (`git:<rev>`, with
`-dirty` when tracked files differ from it) and the data version it ran on (`data:<md5>`,
DVC's md5 of the manifest, the name `tlflow history` prints), so runs can be filtered by both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from tlflow.flows.history import current_data_version
from tlflow.flows.stages import STAGES, commit, rescanned, stage_runner, why_stale
from tlflow.tasks.lib.core import gitrepo, interrupts
from tlflow.tasks.lib.core.errors import TlflowError, environment_error
from tlflow.tasks.lib.core.params import load_params

BAD_INPUT = "BadInput"
SKIPPED = "Skipped"
RUNNING: list = []  # this process's flow run id while it runs (Cancelled if interrupted)


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage in one run."""

    name: str
    ran: bool
    reason: str
    seconds: float


# What may pass on a second try: the machine's I/O (a disk or network hiccup, a timeout).
# Bad configuration or input (a TlflowError), the machine's limits (a full disk, a read-only
# folder, a name too long: `environment_error`) and bugs (ImportError, TypeError...) would fail
# the same way again.
TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _not_bad_input(_task, _task_run, state: State) -> bool:
    """Retry transient failures only (TRANSIENT): never bad input, never the machine's
    limits, never a bug."""
    if state.name == BAD_INPUT or interrupts.received() is not None:
        return False
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TRANSIENT) and environment_error(exc) is None


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def run_stage(name: str, force: bool = False) -> StageResult | State:
    """Run one stage if DVC calls it stale (or when forced), then record it in dvc.lock."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    interrupts.check()  # a signal held off between stages: no stage starts after it
    interrupts.doing(name)
    try:  # bad params, bad input, or DVC refusing (no git, a broken dvc.lock): no retry
        params = load_params()
        stale = "forced" if force else why_stale(name)
        reason = stale or rescanned(name, params)
        if reason is None:
            logger.info("%s: up to date, skipped", name)
            why = "up to date: dvc.lock matches its deps, params and outs"
            return Completed(name=SKIPPED, message=why,
                             data=StageResult(name, False, "up to date", 0.0))
        logger.info("%s: running (%s)", name, reason)
        stage_runner(name)(params)
        if stale is None and why_stale(name) is None:  # a rescan that found nothing new
            logger.info("%s: %s, nothing changed", name, reason)
            why = f"up to date: {reason}, nothing changed"
            return Completed(name=SKIPPED, message=why, data=StageResult(
                name, False, f"up to date ({reason}, unchanged)", time.perf_counter() - t0))
        commit(name)
    except TlflowError as err:
        logger.error("%s", err)
        return Failed(name=BAD_INPUT, message=str(err))
    except Exception as err:  # a full disk, a read-only folder: one line, never retried
        env = environment_error(err)
        if env is None:
            raise
        logger.error("%s: %s", name, env)
        return Failed(name=BAD_INPUT, message=str(env))
    return StageResult(name, True, reason, time.perf_counter() - t0)


@task(cache_policy=NO_CACHE, task_run_name="new images")
def judge_new_images(new: list) -> str:
    """Judge the run's new images (manifest rows) by the probe train is about to replace,
    record it (flows/drift.py) and log the summary line; that line."""
    from tlflow.flows import drift

    said = drift.line(drift.record(load_params().base.paths, new))
    get_run_logger().info("%s", said)
    return said


def mark_cancelled(message: str) -> None:
    """Mark this process's flow run, and its task runs that did not finish, Cancelled (an
    interrupt leaves them Crashed, or Running when it struck between two API calls)."""
    if not RUNNING:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=RUNNING)))
        for run in runs:
            if run.state is None or not run.state.is_final() or run.state.is_crashed():
                client.set_task_run_state(run.id, Cancelled(message=message), force=True)
        client.set_flow_run_state(RUNNING[0], Cancelled(message=message), force=True)


def tag_run(*tags: str) -> None:
    """Add tags to the running flow run (its own tags and those it was created with stay):
    the data version is known only once ingest has run, so tags are set from inside."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    merged = sorted({*ctx.flow_run.tags, *tags})
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, tags=merged)
    ctx.flow_run.tags = merged


def run_name() -> str:
    """The flow run's name: the project (base.project) and the UTC time, e.g.
    "my-flowers 2026-12-04 21:30:05", so runs of projects sharing one server read apart."""
    from datetime import datetime

    try:
        project = load_params().base.project
    except TlflowError:  # bad params: the run itself says so, in its first stage
        project = "tlflow"
    return f"{project} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"


@flow(name="tlflow-pipeline", flow_run_name=run_name, log_prints=True)
def pipeline(force: bool = False) -> list[StageResult] | State:
    """Every stage in order; a stage that fails stops the run and keeps what came before.

    Transient failures are retried (run.retries); the summary and the per-class metrics are
    published as artifacts, against what the previous run left. Between extract and train,
    the images the run brought are judged by the probe that served before it (flows/drift.py).
    """
    from prefect.context import FlowRunContext

    from tlflow.flows import drift
    from tlflow.flows.artifacts import Snapshot, publish_summary
    from tlflow.flows.html_report import write_html_report

    ctx = FlowRunContext.get()
    RUNNING[:] = [ctx.flow_run.id] if ctx and ctx.flow_run else []
    params = load_params()
    paths, cfg = params.base.paths, params.run
    stage = run_stage.with_options(retries=cfg.retries,
                                   retry_delay_seconds=cfg.retry_delay_seconds,
                                   retry_condition_fn=_not_bad_input)
    before = Snapshot.take(paths)
    drift.forget(paths)  # the summary speaks of this run's new images only
    rev = gitrepo.revision()  # HEAD's short hash (+ -dirty); None outside git
    tags = [f"project:{params.base.project}", *([f"git:{rev}"] if rev else [])]
    results = []
    for name in STAGES:
        state = stage(name, force, return_state=True)
        if name == "ingest" and state.is_completed() and (data := current_data_version(paths)):
            tags.append(f"data:{data}")
        if state.is_failed():
            tag_run(*tags)
            publish_summary(params.base.project, paths, before, results,
                            failed=f"{name}: {state.message}")
            return Failed(name=state.name, message=state.message)
        if name == "ingest":
            tag_run(*tags)
        results.append(state.result())
        if name == "extract" and (new := drift.to_judge(paths, before.images)):
            judge_new_images(new)  # by the probe train is about to replace
    print(write_html_report(paths, before))  # before the summary, which links it
    publish_summary(params.base.project, paths, before, results)
    return results


def clear_schedule(name: str) -> None:
    """Pause the served deployment (`tlflow-pipeline/<name>`) and delete its runs still
    Scheduled: nobody serves them now, and they would clutter the UI. Prefect 3's serve does
    the same on a clean shutdown (pause_on_shutdown; pausing deletes auto-scheduled runs);
    this also covers runs scheduled by hand. Serving again resumes the same deployment."""
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


def deploy(name: str, pool: str, cron: str | None, interval: float | None) -> object:
    """Register a deployment `tlflow-pipeline/<name>` of this project's flow (the current
    folder as its source) on the work pool `pool`, one run at a time; Prefect's deployment id.

    Raises TlflowError on Prefect's failures (no server, an unknown pool, a bad schedule)."""
    from pathlib import Path

    source = pipeline.from_source(source=str(Path.cwd()),
                                  entrypoint="tlflow.flows.pipeline.pipeline")
    try:
        return source.deploy(name=name, work_pool_name=pool, cron=cron, interval=interval,
                             concurrency_limit=1, print_next_steps=False)
    except Exception as err:  # Prefect's errors: no server, unknown pool...
        raise TlflowError(f"tlflow deploy: {type(err).__name__}: {err}") from None
