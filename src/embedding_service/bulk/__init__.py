"""Bulk embedding of files: streaming, resumable, in this process, through servers, or on Ray (docs/bulk.md).

The names below load on first use: pyarrow (the `bulk` extra) must not be needed to import the CLI, which
builds the `embed` subcommand's parser even to run `serve`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .local import EmbedOptions, LocalEmbedder
    from .readers import BulkInputError
    from .runner import Job, Summary, run_job

__all__ = ["BulkInputError", "EmbedOptions", "Job", "LocalEmbedder", "Summary", "run_job"]

_WHERE = {"EmbedOptions": "local", "LocalEmbedder": "local", "BulkInputError": "readers", "Job": "runner",
          "Summary": "runner", "run_job": "runner"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
