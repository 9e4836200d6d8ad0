"""Which model serves: the promotion rule (a candidate replaces the serving model only if its
val accuracy is not worse by more than a margin, on comparable terms)."""

from __future__ import annotations

from typing import Any


def promotion(current: dict[str, Any] | None, candidate: dict[str, Any],
              margin: float | None) -> tuple[bool, str]:
    """Does the candidate replace the current model? Only if its val accuracy is not worse
    than the current one's by more than `margin`, when the two are comparable (same
    extractor, val split and classes); otherwise it is taken. Returns (yes?, why)."""
    if margin is None:
        return True, "promotion check off (train.promote_margin: null)"
    if current is None:
        return True, "no model serves yet"
    for key in ("extractor_id", "val_set", "classes"):
        if current.get(key) != candidate.get(key):
            return True, f"the serving model has other {key}: not comparable"
    new, old = candidate["val_accuracy"], current["val_accuracy"]
    if new >= old - margin:
        return True, f"val accuracy {new:.4f} >= serving {old:.4f} - margin {margin:g}"
    return False, (f"val accuracy {new:.4f} < serving {old:.4f} - margin {margin:g}: "
                   "the serving model stays")
