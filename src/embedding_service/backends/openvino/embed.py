"""The OpenVINO backend: the model exported once to OpenVINO IR (fp32, or int8), run by OpenVINO's CPU plugin.

Why: on CPU the model's arithmetic is the wall (bench/RESULTS.md); OpenVINO's fused kernels run MiniLM fp32
several times faster than eager torch, with equal vectors, and int8 cheaper still at a stated accuracy cost.
The export (torch -> IR, optionally int8 through NNCF) runs once per model and settings into a cache folder;
later starts only read the IR. Tokenisation and pooling are the shared ones, so vectors match other engines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..base import TRANSFORMERS_BUILD, BackendInfo, BackendLoadError, BackendOptions, first_line
from ..model.pooling import l2_normalize, pool_numpy
from ..model.tokenization import HfTokenizer, SavedTokenizer, TokenizerHolder
from ..runtime.device import cpu_flags, int8_slow_reason, resolve_cpu_dtype
from ..runtime.length_groups import embed_in_groups
from .packing import PackedBatch, packed_module
from .smooth_quant import ALPHA, calibration_batches, smooth_decoder

__all__ = ["EXAMPLE_ROWS", "EXPORT_VERSION", "QUANTIZE_MODES", "OpenVinoBackend", "cached_export", "compile_ir",
           "compile_threads", "default_cache_dir", "export_key", "export_module", "import_openvino",
           "last_hidden_module", "load_saved_tokenizer", "pad_batch", "require_conversion_libraries",
           "save_tokenizer_state", "tokenizer_fingerprint"]

log = logging.getLogger("embedding_service")
T = TypeVar("T")

QUANTIZE_MODES = ("none", "int8")
# Bumped whenever the export itself changes, so caches written by an older export are not reused.
EXPORT_VERSION = "3"  # 3: int8 of Llama-style decoders smoothed first (openvino_smooth_quant.py)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_STATE = "tokenizer-state.json"
# OpenVINO's precision hint per dtype (float16 is first resolved to bf16 or fp32 like on the other engines).
_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
# The CPU plugin keeps compiled kernels per input shape, 5,000 by default at ~0.3 MB each (MiniLM); with
# dynamic batching nearly every batch is a new (rows, tokens) shape, so memory grew ~1 GB an hour. 64 bounds it
# (docs/reliability.md "Memory under long traffic"); an evicted shape's kernels are rebuilt when it comes back.
RUNTIME_CACHE_CAPACITY = 64
# The batch an export traces: a padded row in it, so that the graph handles masks in general.
EXAMPLE_ROWS = [[1, 2, 3, 4, 5, 6], [1, 2, 3]]
# A packed export's, in rows of 9 tokens: two texts sharing a row, and a row that ends in padding (packing.py).
_PACKED_EXAMPLE_ROWS = [[1, 2, 3, 4, 5, 6], [1, 2, 3], [1, 2]]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/embedding-service/openvino (~/.cache/... when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedding-service" / "openvino"


def export_key(model_dir: str, variant: str, runtime_version: str) -> str:
    """What an exported IR depends on: the model folder's config and weight files, the variant (the quantize
    mode of an embedding model, or the reranker's kind), the runtime."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256()
    for part in (EXPORT_VERSION, variant, runtime_version, str(root)):
        digest.update(part.encode() + b"\0")
    config = root / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    _digest_files(digest, root, weights=True)
    return f"{root.name}-{variant}-{digest.hexdigest()[:16]}"


def tokenizer_fingerprint(model_dir: str) -> str:
    """What a saved tokenizer depends on: the folder's other files (size + mtime) and the `tokenizers` package
    that runs it. (The transformers version it was checked against is kept apart: see load_saved_tokenizer.)"""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256()
    digest.update(f"tokenizers={_version('tokenizers')}".encode() + b"\0")
    _digest_files(digest, root, weights=False)
    return digest.hexdigest()[:16]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# --- the tokenizer, saved beside the export: a cached start then imports neither transformers nor torch ---
def load_saved_tokenizer(folder: Path, fingerprint: str, build: Callable[[dict[str, Any]], T]) -> T | None:
    """`build(state)` from the state saved in `folder` for these tokenizer files; None when there is none, it
    is stale, or it is unreadable (then with a warning): transformers' path is always right."""
    path = folder / TOKENIZER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            return None
        # Checked against another transformers than the one here: check again. Without transformers (a
        # prepared image) there is nothing to check against, and the saved tokenizer is the one to use.
        here = _version("transformers")
        if here is not None and state.get("transformers") != here:
            return None
        built = build(state)
    except FileNotFoundError:
        return None
    except Exception as exc:  # unreadable, or written by another version
        log.warning("openvino: ignoring the saved tokenizer %s: %s", path, first_line(exc))
        return None
    log.info("openvino: tokenizer from %s (transformers not loaded)", path)
    return built


def require_conversion_libraries(model_dir: str, *names: str) -> None:
    """BackendLoadError saying what to do when a step that only a first start runs (checking the tokenizer,
    converting the model) lacks its libraries: a prepared image has no torch or transformers, and holds only
    the exports it was built with."""
    missing = [name for name in names if find_spec(name) is None]
    if missing:
        raise BackendLoadError(
            f"openvino: {model_dir} has no export or saved tokenizer for these settings in the cache, and making "
            f"them needs {' and '.join(missing)} (pip install 'embedding-service[torch,openvino]'; a prepared "
            "image serves only the model and settings it was built with)")


def save_tokenizer_state(folder: Path, fingerprint: str, state: dict[str, Any] | None) -> None:
    """Save a checked Rust tokenizer's state for later starts (best effort: a read-only cache only costs
    time); None (texts take transformers' path) saves nothing."""
    if state is None:
        return
    state = {**state, "fingerprint": fingerprint, "transformers": _version("transformers")}
    staging = folder / f".tokenizer-{os.getpid()}-{threading.get_ident()}"
    try:
        staging.write_text(json.dumps(state), encoding="utf-8")
        os.replace(staging, folder / TOKENIZER_STATE)  # atomic: a reader sees all of it or none
    except OSError as exc:
        staging.unlink(missing_ok=True)
        log.info("openvino: cannot save the tokenizer in %s: %s", folder, exc)


def _digest_files(digest: Any, root: Path, *, weights: bool) -> None:
    """Add the name, size and mtime of the folder's weight files (or of all its other files) to `digest`:
    cheap, and changes whenever a file is replaced."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and (path.suffix in _WEIGHT_SUFFIXES) == weights:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode() + b"\0")


class OpenVinoBackend(TokenizerHolder):
    """Any Hugging Face encoder (and, where OpenVINO converts it, decoder) embedding model on OpenVINO."""

    def __init__(self, options: BackendOptions) -> None:
        if options.quantize not in QUANTIZE_MODES:
            raise BackendLoadError(f"unknown quantize mode '{options.quantize}' "
                                   f"(choose from {', '.join(QUANTIZE_MODES)})")
        self._options = options
        self._model_dir = options.model_dir
        self._quantize = options.quantize
        cache_dir = options.openvino_cache_dir
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._tokenizer: HfTokenizer | SavedTokenizer | None = None
        self._request: Any = None
        self._pad_id = 0
        self._packed = False
        self._lock = threading.Lock()  # one InferRequest: one batch at a time
        self.ir_path: Path | None = None

    def load(self) -> BackendInfo:
        ov = import_openvino(self._options)
        opts, facts = self._options, self._options.facts
        if not facts.config_found:
            raise BackendLoadError(f"cannot read {self._model_dir}/config.json")
        dtype = resolve_cpu_dtype(opts.dtype)
        if self._quantize == "int8" and (reason := int8_slow_reason(cpu_flags())):
            log.warning("openvino: --quantize int8 gains little on this CPU: %s", reason)
        runtime_version = ov.get_version()
        # Causal decoders pooled on their last token run packed (packing.py): no compute on padding.
        self._packed = facts.decoder and facts.pooling == "last"
        variant = f"{self._quantize}-packed" if self._packed else self._quantize
        folder = self._cache_dir / export_key(self._model_dir, variant, runtime_version)
        fingerprint = tokenizer_fingerprint(self._model_dir)
        saved = load_saved_tokenizer(folder, fingerprint, SavedTokenizer)
        self._tokenizer = saved if saved is not None else self._hf_tokenizer()
        self._pad_id, suffix = self._tokenizer.pad_id, list(self._tokenizer.special_suffix)
        self.ir_path = cached_export(
            self._cache_dir, folder, self._model_dir, variant, runtime_version,
            lambda target: _export(self._model_dir, target, self._quantize, self._pad_id, suffix, self._packed))
        if isinstance(self._tokenizer, HfTokenizer):  # checked by this start: saved for the next ones
            save_tokenizer_state(folder, fingerprint, self._tokenizer.state())
        self._request = compile_ir(ov, self.ir_path, dtype, self._quantize, activation_group(facts.linear_widths))
        probe = [*self._tokenizer.special_prefix, 0, *self._tokenizer.special_suffix]
        dimension = int(self.embed([probe]).shape[1])
        log.info("openvino backend: %s on cpu (%s, quantize=%s, %d threads), pooling=%s, dim=%d, IR %s",
                 opts.model_label, dtype, self._quantize, compile_threads(), facts.pooling, dimension, self.ir_path)
        return BackendInfo.of_embedding_model(
            opts, self._tokenizer, engine="openvino", device="cpu",
            dtype=dtype if self._quantize == "none" else f"{dtype}+int8", dimension=dimension,
            max_model_len=facts.length_limit(opts.max_model_len))

    def _hf_tokenizer(self) -> HfTokenizer:
        require_conversion_libraries(self._model_dir, "transformers")
        try:
            return HfTokenizer(self._model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load the tokenizer of {self._model_dir}: {exc}") from exc

    # --- the contract ---------------------------------------------------------------------------------
    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        assert self._request is not None, "load() first"
        if self._packed:
            packed = PackedBatch(batch, self._pad_id)
            with self._lock:
                hidden = self._request.infer(packed.inputs())[0]
            return l2_normalize(packed.last_states(hidden))
        return embed_in_groups(batch, self._forward)  # (rows of similar lengths together: less padding)

    def _forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        # Right padding for every model, decoders too (last-token pooling reads each row's last real token):
        # left-padded rows of a causal model have pad positions that see nothing, and their NaN states
        # leak into the real tokens in OpenVINO's attention (0 x NaN); right padding has no such row.
        ids, mask = pad_batch(batch, self._pad_id)
        with self._lock:
            hidden = self._request.infer({"input_ids": ids, "attention_mask": mask})[0]
        return l2_normalize(pool_numpy(self._options.facts.pooling, hidden, mask))

    def close(self) -> None:
        self._request = None
        self._tokenizer = None


def import_openvino(options: BackendOptions) -> Any:
    """The openvino module, for a CPU device; BackendLoadError saying what to do otherwise."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendLoadError(f"--engine openvino needs openvino installed "
                               f"(pip install 'embedding-service[openvino]'): {exc}") from exc
    if options.device not in ("auto", "cpu"):
        raise BackendLoadError(f"the openvino engine runs on the CPU; device '{options.device}' "
                               "was requested (use --engine torch or vllm for CUDA)")
    return ov


def compile_threads() -> int:
    return len(os.sched_getaffinity(0)) or 1


def activation_group(linear_widths: Sequence[int]) -> int:
    """int8's activation group: 1,024 channels where that divides every linear layer's input width, else 32.

    Why larger: each group's int32 sums are rescaled in fp32, so fewer groups are less work. On the full-size
    Qwen3 shape (widths 1,024, 2,048, 3,072), 1,024 ran 34-40 texts/s in process against 25-28 at 32, with
    min cos to fp32 0.9982 against 0.9984 on the same shape with outlier channels (SmoothQuant first;
    bench/RESULTS.md). Why not everywhere: a group that does not divide a width makes OpenVINO run without
    dynamic quantisation (MiniLM at 1,024: 0.58x its speed at 32), and on MiniLM the group that fits, 128,
    was +26% but cost min cos 0.9984 -> 0.9963 (tests/test_openvino_backend.py): small models keep 32."""
    return 1024 if linear_widths and all(width % 1024 == 0 for width in linear_widths) else 32


def compile_ir(ov: Any, ir_path: Path, dtype: str, quantize: str, group: int = 32) -> Any:
    """An InferRequest of the IR on the CPU plugin, with the engine's settings (int8: activations quantised
    per `group` channels at run time, no calibration data needed)."""
    settings = {"INFERENCE_PRECISION_HINT": _PRECISION[dtype], "INFERENCE_NUM_THREADS": compile_threads(),
                "PERFORMANCE_HINT": "LATENCY", "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY}
    if quantize == "int8":
        settings["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
    try:
        compiled = ov.Core().compile_model(str(ir_path), "CPU", settings)
    except RuntimeError as exc:
        raise BackendLoadError(f"OpenVINO cannot compile {ir_path}: {first_line(exc)}") from exc
    return compiled.create_infer_request()


def cached_export(cache_dir: Path, folder: Path, model_dir: str, variant: str, runtime_version: str,
                  export: Callable[[Path], None]) -> Path:
    """`folder`/model.xml, running `export(staging/model.xml)` first if absent. The export is written to a
    staging folder and renamed into place: a crash or a second process never leaves half of one."""
    target = folder / "model.xml"
    if target.is_file():
        log.info("openvino: using the exported model in %s", folder)
        return target
    require_conversion_libraries(model_dir, "torch", "transformers")
    log.info("openvino: exporting %s (%s) to %s, once", model_dir, variant, folder)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=cache_dir))
    except OSError as exc:
        raise BackendLoadError(f"openvino: cannot write the export cache {cache_dir}: {exc} "
                               "(set EMBEDDING_OPENVINO_CACHE_DIR)") from exc
    try:
        export(staging / "model.xml")
        (staging / "export.json").write_text(json.dumps(
            {"model_dir": model_dir, "variant": variant, "openvino": runtime_version,
             "export_version": EXPORT_VERSION}), encoding="utf-8")
        try:
            staging.rename(folder)  # atomic: a reader sees a whole export or none
        except OSError:  # another process finished the same export first: use theirs
            if not target.is_file():
                raise
    except BackendLoadError:
        raise
    except Exception as exc:
        raise BackendLoadError(f"openvino: cannot export {model_dir}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int, *, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and attention mask, padded to the longest sequence."""
    longest = max(len(seq) for seq in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, seq in enumerate(batch):
        span = slice(longest - len(seq), longest) if left else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask


def _export(model_dir: str, target: Path, quantize: str, pad_id: int, suffix: list[int], packed: bool) -> None:
    """torch model -> OpenVINO IR with dynamic batch and length (fp32 weights kept), int8 weights if asked
    (a Llama-style decoder smoothed first: openvino_smooth_quant.py; `suffix` closes its calibration rows);
    `packed`: the graph takes packed rows (packing.py) instead of padded ones.

    Converted from the torch model with OpenVINO's own converter (optimum-intel would pin an older
    transformers). torch is needed only here, once per model and settings.
    """
    import torch

    with TRANSFORMERS_BUILD:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    if quantize == "int8" and (smoothed := smooth_decoder(model, calibration_batches(model.config.vocab_size,
                                                                                      suffix))):
        log.info("openvino: SmoothQuant (alpha %.2f) on %d layer inputs before int8", ALPHA, smoothed)
    if packed:
        example = PackedBatch(_PACKED_EXAMPLE_ROWS, pad_id, row_tokens=9).inputs()
        export_module(packed_module(model), tuple(example), tuple(example.values()), target, quantize)
        return
    export_module(last_hidden_module(model), ("input_ids", "attention_mask"), pad_batch(EXAMPLE_ROWS, pad_id), target,
                  quantize)


def last_hidden_module(model: Any) -> Any:
    """The encoder's token states as a module of (input_ids, attention_mask); pooling, normalisation (and a
    reranker's head) stay in numpy, shared with the other engines."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    return LastHidden()


def export_module(module: Any, names: Sequence[str], example: Sequence[np.ndarray], target: Path,
                  quantize: str = "none") -> None:
    """Convert `module` (inputs `names`, traced on `example`, which should hold a padded row so that the graph
    handles masks in general) to IR with dynamic batch and length; int8 weights if asked; fp32 storage."""
    import openvino as ov
    import torch

    # Tracing is not thread-safe: two models exported at once (loaded together) failed with "Couldn't get
    # TorchScript module by tracing". Exports take the transformers builds' turn.
    with TRANSFORMERS_BUILD, torch.inference_mode():
        converted = ov.convert_model(module, example_input=tuple(torch.from_numpy(a) for a in example))
    for port, name in zip(converted.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    converted.reshape({name: ov.PartialShape([-1, -1]) for name in names})
    if quantize == "int8":
        import nncf

        converted = nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(converted, str(target), compress_to_fp16=False)  # fp16 storage would break exactness
