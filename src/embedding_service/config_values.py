"""Values of settings that are not plain fields: what an API key may be, and list fields given as text."""

from __future__ import annotations

import json

__all__ = ["UNUSABLE_KEY", "split_json_or_csv", "usable_api_key"]


# What a client can send in `Authorization: Bearer KEY`: visible ASCII, no spaces (anything else never matches).
UNUSABLE_KEY = "an API key must be visible ASCII characters without spaces (no client could ever send it)"


def usable_api_key(key: str) -> bool:
    return key.isascii() and key.isprintable() and " " not in key


def split_json_or_csv(value: object) -> object:
    """A list field from the environment or a flag: a JSON list, or comma-separated items."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value
