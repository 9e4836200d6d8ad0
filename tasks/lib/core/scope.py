"""What a stage may read of the params: a view of them in which reading a key the stage's
PARAMS do not declare raises (so dvc.yaml's params cannot fall behind the code)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from tlflow.tasks.lib.core.params import Params


class UndeclaredParamError(RuntimeError):
    """A stage read a param its PARAMS do not declare: dvc.yaml would not rerun it when that
    param changes. A bug in tlflow, never the user's: it is not a TlflowError."""


class _View:
    """Read-only view of a params model in which only some dotted keys can be read."""

    __slots__ = ("_keys", "_model", "_prefix")

    def __init__(self, model: BaseModel, keys: frozenset[str], prefix: str) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        key = f"{self._prefix}{name}"
        value = getattr(self._model, name)
        if key in self._keys or any(key.startswith(k + ".") for k in self._keys):
            return value
        if any(k.startswith(key + ".") for k in self._keys):
            return _View(value, self._keys, key + ".")
        raise UndeclaredParamError(
            f"{key}: read by a stage whose PARAMS do not declare it (add it there and to the "
            "stage's params in dvc.yaml)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only")


def scoped(params: Params, keys: Iterable[str]) -> Params:
    """`params` as a stage may see them: the declared keys (a section or section.key),
    base.paths, whose files dvc.yaml declares as deps and outs, and base.project, the name
    that no output depends on (flow runs and artifacts carry it). Reading anything else raises
    UndeclaredParamError, so the declaration that dvc.yaml is checked against (PARAMS in
    tasks/<stage>.py) cannot fall behind the code."""
    return _View(params, frozenset(keys) | {"base.paths", "base.project"}, "")  # type: ignore[return-value]
