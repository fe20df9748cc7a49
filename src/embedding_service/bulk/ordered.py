"""Chunks in flight, written in order: a bulk job starts each chunk's work as it reads it, keeps at most `depth`
in flight, and finishes (writes) them oldest first; whatever is still running when the job stops is cancelled."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["InOrder"]

T = TypeVar("T")
R = TypeVar("R")


class InOrder(Generic[T, R]):
    def __init__(self, depth: int, finish: Callable[[T, asyncio.Task[R]], Awaitable[None]]) -> None:
        self.depth, self.finish = depth, finish  # finish(item, its task): awaits the task, writes the result
        self._pending: deque[tuple[T, asyncio.Task[R]]] = deque()

    async def add(self, item: T, work: Coroutine[Any, Any, R]) -> None:
        """Start `work` for `item`; while `depth` are in flight, finish the oldest."""
        self._pending.append((item, asyncio.create_task(work)))
        while len(self._pending) >= self.depth:
            await self.finish(*self._pending.popleft())

    async def drain(self) -> None:
        while self._pending:
            await self.finish(*self._pending.popleft())

    async def __aenter__(self) -> InOrder[T, R]:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for _, task in self._pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in self._pending), return_exceptions=True)
        self._pending.clear()
