"""Processes that do not outlive the one that started them: Linux's parent-death signal
(`prctl(PR_SET_PDEATHSIG)`), the one mechanism behind the temporary Prefect server
(flows/tempserver.py), torchrun's guard and each rank (tasks/lib/scale/torchrun.py, ddp.py).
"""

from __future__ import annotations

import ctypes
import os

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
try:  # loaded once, here: a preexec_fn runs between fork and exec, where dlopen is unsafe
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    _LIBC.prctl  # noqa: B018 - not Linux: no prctl
except (AttributeError, OSError):
    _LIBC = None


def die_with_parent(sig: int, parent: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies; if the parent
    (pid `parent`) already died before the request, exit at once (status 1). Elsewhere than
    Linux nothing is asked: the parent's own clean-up is all there is."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
