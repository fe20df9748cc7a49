"""Who is asking, and which paths need no key: shared by the API-key and rate-limit middleware."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CLIENT_ID_KEY", "is_exempt"]

# Set in the ASGI scope by the auth middleware: "key-<digest prefix>" of the caller's key.
CLIENT_ID_KEY = "embedding_service.client_id"


def is_exempt(path: str, exempt: Sequence[str]) -> bool:
    """Exact paths, or prefixes written with a trailing '*' ("/docs*")."""
    for pattern in exempt:
        if pattern.endswith("*"):
            if path.startswith(pattern[:-1]):
                return True
        elif path == pattern:
            return True
    return False
