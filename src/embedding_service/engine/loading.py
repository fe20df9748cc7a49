"""A server's models at start: loaded together where their engines allow, one at a time where they do not,
and the first failure stops the start.

Each engine loads on its own compute thread (EngineCore.start), so loads that may run together overlap their
file reads, weight conversion and warm-up. Which models load alone is the plan's decision
(service.ModelPlan.loads_alone); they load after the others, one at a time, when no other load changes the
process's (or the device's) memory. A failure cancels the loads still waiting; a load already inside its
thread cannot be interrupted (EngineCore.loading says it runs on), so the caller exits rather than wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .core import EngineCore

__all__ = ["ModelLoad", "ModelLoadError", "load_models"]

log = logging.getLogger("embedding_service")


@dataclass(frozen=True)
class ModelLoad:
    """One model to load: its served name and task (for the failure's line), its engine, and whether it
    must load while nothing else does."""

    name: str
    task: str
    engine: EngineCore
    alone: bool = False


class ModelLoadError(RuntimeError):
    """A model failed to load; the message, one line, names it: `<name> (<task>): <the cause's first line>`
    (the log has the whole cause)."""

    def __init__(self, load: ModelLoad, cause: BaseException) -> None:
        lines = str(cause).strip().splitlines()
        super().__init__(f"{load.name} ({load.task}): {lines[0] if lines else type(cause).__name__}")
        self.model = load.name


async def load_models(loads: Sequence[ModelLoad]) -> None:
    """Start every engine: first those that may load together, at once, then the others one at a time (each
    alone), all in the order given. Raises ModelLoadError for the first failure; the loads not finished are
    cancelled (and so is every load when this call is)."""
    await _together([load for load in loads if not load.alone])
    for load in loads:
        if load.alone:
            await _start(load)


async def _start(load: ModelLoad) -> None:
    try:
        await load.engine.start()
    except Exception as exc:
        log.error("model %s (%s) failed to load: %s", load.name, load.task, exc)
        raise ModelLoadError(load, exc) from exc


async def _together(loads: Sequence[ModelLoad]) -> None:
    tasks = [asyncio.ensure_future(_start(load)) for load in loads]
    try:
        await asyncio.gather(*tasks)  # raises the first failure at once, the others still running
    finally:
        for task in tasks:
            task.cancel()  # (a no-op for those done)
        await asyncio.gather(*tasks, return_exceptions=True)
