"""Crash injection for the resume tests: EMBEDDING_BULK_FAULT=NAME:N kills this process (SIGKILL, like
kill -9) the N-th time (1-based) it reaches the point NAME. Unset, a point costs one dict lookup."""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("EMBEDDING_BULK_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
