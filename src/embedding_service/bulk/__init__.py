"""Bulk embedding of files: streaming, resumable, in this process, through servers, or on Ray (docs/bulk.md)."""

from .local import EmbedOptions, LocalEmbedder
from .readers import BulkInputError
from .runner import Job, Summary, run_job

__all__ = ["BulkInputError", "EmbedOptions", "Job", "LocalEmbedder", "Summary", "run_job"]
