"""The OpenAI Files and Batch APIs over this server's own endpoints (docs/batch.md).

The names below load on first use: `embed --batch-file` imports batch/lines.py and friends without the app
(batch/service.py imports the api package, whose app imports this package back).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import BatchApi, mount_batch_api

__all__ = ["BatchApi", "mount_batch_api"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".service", __name__), name)
