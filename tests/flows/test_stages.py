"""The stage table: each stage runs with the params it declares; DVC's status, compacted."""

import pytest

from tlflow.flows.stages import STAGES, _describe, stage_runner
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.scope import UndeclaredParamError


def test_stages_in_order_and_unknown_names():
    assert STAGES == ("ingest", "extract", "train", "finetune", "evaluate", "audit",
                      "export")
    with pytest.raises(TlflowError, match=r"unknown stage 'nope'"):
        stage_runner("nope")


def test_a_stage_sees_only_its_declared_params(monkeypatch):
    import tlflow.tasks.evaluate

    seen = {}

    def peek(params):
        seen["device"] = params.finetune.device
        with pytest.raises(UndeclaredParamError):
            _ = params.train
        return "ok"

    monkeypatch.setattr(tlflow.tasks.evaluate, "run", peek)
    from tests.conftest import ROOT
    from tlflow.tasks.lib.core.params import load_params

    assert stage_runner("evaluate")(load_params(ROOT / "params.yaml")) == "ok"
    assert seen == {"device": "auto"}


def test_dvc_status_entries_are_compacted():
    def code() -> str:
        return "tlflow's train code changed (0.1.0 → 0.2.0)"

    change = {"changed deps": {"params.yaml": {"train.C_grid": "modified"},
                               "data/manifest.csv": "modified"}}
    assert _describe(change, code) == "params: train.C_grid; deps: data/manifest.csv"
    assert _describe("always changed", code) == "always changed"
    stamp = {"changed deps": {"tlflow-code.yaml": {"train": "modified"}}}
    assert _describe(stamp, code) == code()


def test_only_transient_failures_are_retried():
    """A disk or network hiccup may pass on a second try; bad input and bugs would not."""
    from prefect.states import Failed

    from tlflow.flows.pipeline import BAD_INPUT, _not_bad_input

    assert _not_bad_input(None, None, Failed(data=OSError("the disk hiccuped")))
    assert _not_bad_input(None, None, Failed(data=TimeoutError("slow")))
    assert not _not_bad_input(None, None, Failed(data=ImportError("a bug")))
    assert not _not_bad_input(None, None, Failed(name=BAD_INPUT, message="bad params"))
