"""The Prefect flow: ingest -> extract -> train -> evaluate, rerunning only stale stages.

Freshness has one source of truth: DVC's dvc.lock. A stage runs in-process when `dvc status`
calls it stale, then `dvc commit` records it, so `dvc repro` and `tlflow run` agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from flows.stages import STAGES, commit, stage_runner, why_stale
from tasks.lib.errors import TlflowError
from tasks.lib.params import Params, Paths, load_params

BAD_INPUT = "BadInput"


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage in one run."""

    name: str
    ran: bool
    reason: str
    seconds: float


def _not_bad_input(_task, _task_run, state: State) -> bool:
    """Retry transient failures only: bad configuration or input fails the same way again."""
    return state.name != BAD_INPUT


def _external_source(name: str, params: Params) -> str | None:
    """Folder and CSV sources live outside DVC: ingest rescans them on every run (the stat
    cache makes that cheap) and the stages after it rerun only if the manifest changed."""
    if name != "ingest":
        return None
    source = params.ingest.source
    return f"{source} source rescanned" if source in ("folder", "csv") else None


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def run_stage(name: str, force: bool = False) -> StageResult | State:
    """Run one stage if DVC calls it stale (or when forced), then record it in dvc.lock."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    params = load_params()
    reason = "forced" if force else (why_stale(name) or _external_source(name, params))
    if reason is None:
        logger.info("%s: up to date, skipped", name)
        return StageResult(name, False, "up to date", 0.0)
    logger.info("%s: running (%s)", name, reason)
    try:
        stage_runner(name)(params)
    except TlflowError as err:
        logger.error("%s", err)
        return Failed(name=BAD_INPUT, message=str(err))
    commit(name)
    return StageResult(name, True, reason, time.perf_counter() - t0)


def publish_advice(paths: Paths) -> None:
    """The advice (metrics/strategy.json) as a markdown artifact of the run."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.lib.advice import table
    from tasks.lib.handoff import read_strategy

    if paths.strategy.is_file():
        create_markdown_artifact(markdown="# Strategy\n\n" + table(read_strategy(paths.strategy)),
                                 key="tlflow-strategy",
                                 description="The data set in the 2x2 table, and the plan")


@flow(name="tlflow-pipeline", log_prints=True)
def pipeline(force: bool = False) -> list[StageResult] | State:
    """Every stage in order; a stage that fails stops the run and keeps what came before.

    Transient failures are retried (run.retries); the summary and the per-class metrics are
    published as artifacts, against what the previous run left.
    """
    from flows.report import Snapshot, publish_summary

    params = load_params()
    paths, cfg = params.base.paths, params.run
    stage = run_stage.with_options(retries=cfg.retries,
                                   retry_delay_seconds=cfg.retry_delay_seconds,
                                   retry_condition_fn=_not_bad_input)
    before = Snapshot.take(paths)
    results = []
    for name in STAGES:
        state = stage(name, force, return_state=True)
        if state.is_failed():
            publish_summary(paths, before, results, failed=f"{name}: {state.message}")
            return Failed(name=state.name, message=state.message)
        results.append(state.result())
    publish_advice(paths)
    publish_summary(paths, before, results)
    return results
