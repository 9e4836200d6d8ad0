"""The base of every params.yaml section: frozen, strict, finite numbers, and errors
that say what kind of value a key expects (tlflow.tasks.lib.core.params)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    model_validator,
)


class _Section(BaseModel):
    # finite numbers only: C_grid: [.nan] passed "C > 0" and crashed scikit-learn
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_coercion(cls, data: Any) -> Any:
        """No silent coercion: `seed: true` is not 1, `image_size: "64"` is not 64 (pydantic's
        lax mode would take both); a value of the wrong kind is an error naming its key."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is None:
                continue
            items = value if isinstance(value, list) and _is_tuple(field.annotation) else [value]
            kinds = _kinds(field.annotation)
            for item in items:
                if isinstance(item, bool) and bool not in kinds:
                    raise ValueError(f"{name}: expected {_expected(kinds)}, got {item!r}")
                if isinstance(item, str) and not ({str, Path} & kinds or item in kinds):
                    raise ValueError(f"{name}: expected {_expected(kinds)}, got the string "
                                     f"{item!r}")
        return data


def _kinds(annotation: Any) -> set:
    """The scalar types (and Literal values) an annotation admits, tuples' items included."""
    origin = get_origin(annotation)
    if origin is Literal:
        return set(get_args(annotation))
    if origin is not None:  # Union, Optional, tuple[...]
        return set().union(*(_kinds(a) for a in get_args(annotation) if a is not Ellipsis))
    return {annotation}


def _is_tuple(annotation: Any) -> bool:
    return get_origin(annotation) is tuple or any(
        get_origin(a) is tuple for a in get_args(annotation))


def _expected(kinds: set) -> str:
    names = [k.__name__ if isinstance(k, type) else repr(k) for k in kinds if k is not type(None)]
    return " or ".join(sorted(names)) + (" or null" if type(None) in kinds else "")
