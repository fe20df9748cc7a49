"""A model's int8/uint8 calibration ranges (the `int8_ranges` setting; docs/clients.md, "Vector types").

- `unit` (the default): none here; vector_types.py uses [-1, 1] in every dimension.
- a path to a `.npy` or `.json` file holding a (2, dimension) array (starts, then ends): the operator's ranges,
  checked against the loaded model (its dimension, finite numbers, start <= end).
- `calibrate`: the per-dimension minimum and maximum of the model's own vectors of a stated calibration set
  (data/int8-calibration.txt: 512 paragraphs of the Python Language Reference, PSF licence; data/README.md),
  as sentence-transformers' `quantize_embeddings(calibration_embeddings=...)` computes them. They are embedded
  once per model at load and kept in a cache folder ($XDG_CACHE_HOME/embedding-service/int8-ranges), keyed by
  the model folder's content (config, weights, tokenizer: cache_fingerprint.py), its dimension and default
  prompt, and the calibration set's digest. Not by dtype or engine: the first load's ranges are reused by
  every later one, so that vectors stored from a bf16 and an fp32 server of the same model share their ranges.
  The file's path is logged; copy it and give it as the path on other machines to get the same bytes there.

Either way the ranges are fixed per model, so a vector's bytes depend on that vector alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from ..backends.base import BackendInfo, BackendLoadError
from .cache_fingerprint import model_fingerprint
from .prompts import apply_prompt
from .truncation import keep_start

__all__ = ["CALIBRATE", "UNIT", "calibration_texts", "default_ranges_dir", "load_int8_ranges", "read_ranges_file"]

log = logging.getLogger("embedding_service")

UNIT, CALIBRATE = "unit", "calibrate"
RANGES_SUFFIXES = (".npy", ".json")
_BATCH = 32
_MAX_FILE_BYTES = 64 << 20  # a (2, 8192) float64 array is 128 KiB as .npy; JSON a few times that


def calibration_texts() -> list[str]:
    """The stated calibration set, one text a line (data/README.md says what it is)."""
    text = resources.files("embedding_service").joinpath("data/int8-calibration.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def default_ranges_dir() -> Path:
    """$XDG_CACHE_HOME/embedding-service/int8-ranges (~/.cache/... when unset), beside the openvino exports."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedding-service" / "int8-ranges"


def checked_ranges(ranges: np.ndarray, dimension: int, where: str) -> np.ndarray:
    """`ranges` as float32 (2, dimension), or BackendLoadError saying what is wrong with them."""
    if ranges.ndim != 2 or ranges.shape != (2, dimension):
        raise BackendLoadError(f"int8_ranges {where}: expected a (2, {dimension}) array (starts, then ends) for "
                               f"this model's {dimension} dimensions, got shape {tuple(ranges.shape)}")
    ranges = ranges.astype(np.float32)
    if not np.isfinite(ranges).all():
        raise BackendLoadError(f"int8_ranges {where}: holds a NaN or an infinity")
    bad = np.flatnonzero(ranges[0] > ranges[1])
    if bad.size:
        raise BackendLoadError(f"int8_ranges {where}: dimension {int(bad[0])} starts above its end "
                               f"({ranges[0, bad[0]]} > {ranges[1, bad[0]]})")
    return ranges


def read_ranges_file(path: str, dimension: int) -> np.ndarray:
    """An operator's ranges: a .npy array or a JSON list of two lists (starts, ends)."""
    file = Path(path).expanduser()
    try:
        if file.stat().st_size > _MAX_FILE_BYTES:
            raise BackendLoadError(f"int8_ranges {path}: larger than {_MAX_FILE_BYTES} bytes")
        if file.suffix == ".npy":
            array = np.load(file, allow_pickle=False)
        else:
            array = np.asarray(json.loads(file.read_text(encoding="utf-8")), dtype=np.float64)
    except OSError as exc:
        raise BackendLoadError(f"int8_ranges {path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:  # not an array, ragged lists, a pickled object
        raise BackendLoadError(f"int8_ranges {path}: not a (2, dimension) array of numbers: {exc}") from None
    return checked_ranges(np.asarray(array), dimension, path)


def _calibration_key(model_dir: str, info: BackendInfo, texts: Sequence[str]) -> str:
    digest = hashlib.blake2b("\n".join(texts).encode(), digest_size=16).hexdigest()
    numerics = {"int8_calibration": digest, "dimension": info.dimension, "prompt": info.default_prompt_name,
                # no folder (the fake engine): its label and engine name it
                **({} if model_dir else {"model": info.model, "engine": info.engine})}
    return model_fingerprint(model_dir, numerics, by_content=True)


def calibrate(texts: Sequence[str], info: BackendInfo, tokenize: Callable[[Sequence[str]], list[list[int]]],
              embed: Callable[[Sequence[Sequence[int]]], np.ndarray]) -> np.ndarray:
    """Per-dimension (min, max) of the model's vectors of `texts` as /v1/embeddings embeds a text sent alone
    (the model's default prompt, if any), each cut to the model's limit keeping the end token the model may
    pool on, in batches of 32 of similar lengths (less padding; a minimum and a maximum ignore the order)."""
    prompted = apply_prompt(list(texts), instruction=None, prompt_name=None, prompts=info.prompts,
                            default_prompt_name=info.default_prompt_name)
    seqs = sorted((keep_start(ids, info.max_model_len, info) if len(ids) > info.max_model_len else ids
                   for ids in tokenize(prompted)), key=len)
    vectors = np.concatenate([embed(seqs[i:i + _BATCH]) for i in range(0, len(seqs), _BATCH)])
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def _save(ranges: np.ndarray, target: Path) -> None:
    """Written to a temporary file and renamed: a crash or a second process never leaves half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".ranges-", suffix=".npy", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, ranges, allow_pickle=False)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def load_int8_ranges(setting: str, info: BackendInfo, model_dir: str,
                     tokenize: Callable[[Sequence[str]], list[list[int]]],
                     embed: Callable[[Sequence[Sequence[int]]], np.ndarray],
                     cache_dir: Path | None = None) -> np.ndarray | None:
    """The loaded model's ranges by `setting` (module docstring): None for `unit`. Raises BackendLoadError."""
    if setting == UNIT:
        return None
    if setting != CALIBRATE:
        return read_ranges_file(setting, info.dimension)
    texts = calibration_texts()
    key = _calibration_key(model_dir, info, texts)
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", info.model).strip("-.") or "model"
    target = (cache_dir or default_ranges_dir()) / f"{label}-{key[:16]}.npy"
    if target.is_file():
        log.info("int8_ranges: using the calibrated ranges in %s", target)
        return read_ranges_file(str(target), info.dimension)
    ranges = calibrate(texts, info, tokenize, embed)
    try:
        _save(ranges, target)
        log.info("int8_ranges: calibrated on %d texts, kept in %s (give that file as int8_ranges on other "
                 "machines for the same bytes)", len(texts), target)
    except OSError as exc:  # a read-only home: serve the ranges anyway, say they are not kept
        log.warning("int8_ranges: cannot keep the calibrated ranges in %s (%s): they are recomputed at every "
                    "start", target, exc)
    return ranges
