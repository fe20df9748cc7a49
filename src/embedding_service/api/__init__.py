"""HTTP layer: the FastAPI application and its routes."""

from .app import create_app

__all__ = ["create_app"]
