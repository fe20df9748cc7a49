"""A served model's identity for the result cache (docs/cache.md): what decides its vectors, given the ids.

The numerics-relevant settings (engine, dtype, quantisation, device, compilation, pooling, normalisation)
are always in it. For the in-memory cache, which lives and dies with the process that loaded the model, the
model folder's path names the weights. A shared (Redis) store outlives the process and is read by other
instances, so there the weights are named by their content: every config and weight file of the folder,
hashed in full (blake2b, about 1 GB/s: a second for Qwen3-Embedding-0.6B, at start) - a different
fine-tune at the same path, or the same model at another path, is then told apart or shared correctly.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["FORMAT", "model_fingerprint"]

log = logging.getLogger("embedding_service")

FORMAT = 1  # the layout of keys and values; a change makes every old entry unreachable
CONTENT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")  # configs, weights, tokenizer files
CHUNK = 1 << 20


def model_fingerprint(model_dir: str, numerics: Mapping[str, object], *, by_content: bool) -> str:
    """Hex digest of the cache format, `numerics` (settings that change vectors) and the model: its folder's
    path, or with `by_content` its files' bytes. No folder (the fake engine): the settings alone."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format={FORMAT};".encode())
    for name in sorted(numerics):
        digest.update(f"{name}={numerics[name]!r};".encode())
    if model_dir and by_content:
        started = time.perf_counter()
        folder = Path(model_dir)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in CONTENT_SUFFIXES)
        for path in files:
            digest.update(f"file={path.relative_to(folder).as_posix()};size={path.stat().st_size};".encode())
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        log.info("result cache: model %s fingerprinted by content (%d files) in %.1fs", model_dir, len(files),
                 time.perf_counter() - started)
    elif model_dir:
        digest.update(f"dir={Path(model_dir).resolve()};".encode())
    return digest.hexdigest()
