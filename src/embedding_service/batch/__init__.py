"""The OpenAI Files and Batch APIs over this server's own endpoints (docs/batch.md)."""

from .service import BatchApi, mount_batch_api

__all__ = ["BatchApi", "mount_batch_api"]
