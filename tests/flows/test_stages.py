"""The stage table: each stage runs with the params it declares; DVC's status, compacted."""

import pytest

from flows.stages import STAGES, _describe, stage_runner
from tasks.lib.errors import TlflowError
from tasks.lib.params import UndeclaredParamError


def test_stages_in_order_and_unknown_names():
    assert STAGES == ("ingest", "extract", "train", "finetune", "evaluate", "audit")
    with pytest.raises(TlflowError, match=r"unknown stage 'nope'"):
        stage_runner("nope")


def test_a_stage_sees_only_its_declared_params(monkeypatch):
    import tasks.evaluate

    seen = {}

    def peek(params):
        seen["device"] = params.finetune.device
        with pytest.raises(UndeclaredParamError):
            _ = params.train
        return "ok"

    monkeypatch.setattr(tasks.evaluate, "run", peek)
    from tasks.lib.params import load_params
    from tests.conftest import ROOT

    assert stage_runner("evaluate")(load_params(ROOT / "params.yaml")) == "ok"
    assert seen == {"device": "auto"}


def test_dvc_status_entries_are_compacted():
    change = {"changed deps": {"params.yaml": {"train.C_grid": "modified"},
                               "tasks/lib/probes.py": "modified"}}
    assert _describe(change) == "params: train.C_grid; deps: tasks/lib/probes.py"
    assert _describe("always changed") == "always changed"


def test_only_transient_failures_are_retried():
    """A disk or network hiccup may pass on a second try; bad input and bugs would not."""
    from prefect.states import Failed

    from flows.pipeline import BAD_INPUT, _not_bad_input

    assert _not_bad_input(None, None, Failed(data=OSError("the disk hiccuped")))
    assert _not_bad_input(None, None, Failed(data=TimeoutError("slow")))
    assert not _not_bad_input(None, None, Failed(data=ImportError("a bug")))
    assert not _not_bad_input(None, None, Failed(name=BAD_INPUT, message="bad params"))
