"""Background priority for work that must not slow online requests (Batch API lines): whoever runs such work
enters `background()`; the engine core reads `in_background()` where the work reaches it (admission, the
batcher's lane), so the endpoint code in between needs no flag of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["background", "in_background"]

_BACKGROUND: ContextVar[bool] = ContextVar("embedding_background", default=False)


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Run the block's engine work at background priority (tasks it creates inherit it)."""
    token = _BACKGROUND.set(True)
    try:
        yield
    finally:
        _BACKGROUND.reset(token)


def in_background() -> bool:
    return _BACKGROUND.get()
