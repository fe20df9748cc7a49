"""The backend contract: load a model, tokenize, embed a batch of token ids into L2-normalised float32."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .model.facts import ModelFacts

if TYPE_CHECKING:
    from ..config import EmbeddingConfig

__all__ = [
    "TRANSFORMERS_BUILD",
    "Backend",
    "BackendDeadError",
    "BackendInfo",
    "BackendLoadError",
    "BackendOptions",
    "first_line",
]

# Held by every backend while transformers builds a model or a tokenizer (imports included). from_pretrained
# changes process-wide state while it runs (torch's default dtype; PreTrainedModel.tie_weights and torch's init
# functions, patched and put back: transformers 5.x, initialization.py) and its lazy imports are not
# thread-safe, so two builds at once could leave a model's weights untied or in the other's dtype. The rest of
# a load (moving to the device, the warm-up, openvino's compile) runs beside other loads (engine/loading.py).
TRANSFORMERS_BUILD = threading.RLock()


class BackendLoadError(RuntimeError):
    """The model could not be loaded (bad path, no copy and no hub, unsupported model, out of memory)."""


class BackendDeadError(RuntimeError):
    """The backend can no longer serve (its worker process died); the engine turns unhealthy."""


@dataclass(frozen=True)
class BackendOptions:
    """What a model runtime is asked to load, from the settings (defaults live in EmbeddingConfig only).

    `max_model_len` is a ceiling: the backend lowers it to what the model itself takes (facts.length_limit),
    and reports the result in BackendInfo. The vLLM-only fields are ignored by the other backends.
    """

    model_dir: str  # a local folder (the fake backend takes any string)
    facts: ModelFacts  # what the folder says about the model, read once (model_facts.py)
    model_label: str  # the name logs and BackendInfo.model carry
    device: str  # auto, cpu or cuda
    dtype: str  # float16, bfloat16 or float32, as requested
    max_model_len: int
    matryoshka: bool  # accepts `dimensions`: listed in matryoshka_models, or detected (Qwen3)
    gpu_memory_utilization: float
    tensor_parallel_size: int
    enforce_eager: bool
    torch_compile: bool  # torch engine: compiled forwards (CUDA graphs on a GPU)
    vllm_engine_core: str  # auto, in-process or separate
    prefix_caching: bool  # vLLM: its default (on where the model supports it), or off
    quantize: str  # openvino: none or int8
    openvino_cache_dir: str | None  # openvino: folder of exported models (None: its default)

    @classmethod
    def from_config(cls, settings: EmbeddingConfig, model_dir: str, facts: ModelFacts) -> BackendOptions:
        return cls(
            model_dir=model_dir,
            facts=facts,
            model_label=settings.public_model_name,
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            matryoshka=settings.matryoshka_listed or facts.matryoshka,  # the one Matryoshka rule
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            enforce_eager=settings.enforce_eager,
            torch_compile=settings.torch_compile,
            vllm_engine_core=settings.vllm_engine_core,
            prefix_caching=settings.prefix_caching,
            quantize=settings.quantize,
            openvino_cache_dir=settings.openvino_cache_dir,
        )


@dataclass(frozen=True)
class BackendInfo:
    """What the engine and the API need to know about a loaded model."""

    model: str  # what was loaded (hub id or directory)
    device: str  # "cpu" or "cuda"
    dtype: str  # the dtype actually used
    dimension: int
    max_model_len: int
    vocab_size: int
    # Special tokens the tokenizer adds around every text (Qwen3: <|endoftext|> after; BERT: [CLS] before,
    # [SEP] after). Token-id inputs lacking them get them added, so that ids and text give the same vector.
    special_prefix: tuple[int, ...] = ()
    special_suffix: tuple[int, ...] = ()
    matryoshka: bool = False
    # sentence-transformers prompts (name -> prefix) and the one applied by default, if any.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # Cost model for the batcher's token budget: padded backends pay max_len x n, others the sum.
    padded: bool = True
    # How many batches may be in flight at once (vLLM schedules several itself; torch runs one).
    max_concurrent_batches: int = 1
    engine: str = "torch"
    # "embed": rows are unit vectors; "rerank": one column, the score of a (query, document) pair.
    task: str = "embed"
    # int8/uint8 calibration ranges, float32 (2, dimension), set by the engine after the load (the
    # `int8_ranges` setting: engine/int8_ranges.py); None: [-1, 1] in every dimension.
    int8_ranges: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of_embedding_model(cls, options: BackendOptions, tokenizer: Any, *, engine: str, device: str, dtype: str,
                           dimension: int, max_model_len: int, padded: bool = True,
                           max_concurrent_batches: int = 1) -> BackendInfo:
        """An embedding model's info: what the options, the folder's facts and the tokenizer say, plus what
        the runtime decided (the one place the common fields are filled)."""
        facts = options.facts
        return cls(model=options.model_label, device=device, dtype=dtype, dimension=dimension,
                   max_model_len=max_model_len, vocab_size=tokenizer.vocab_size,
                   special_prefix=tuple(tokenizer.special_prefix), special_suffix=tuple(tokenizer.special_suffix),
                   matryoshka=options.matryoshka, prompts=facts.prompts,
                   default_prompt_name=facts.default_prompt_name, padded=padded,
                   max_concurrent_batches=max_concurrent_batches, engine=engine)


@runtime_checkable
class Backend(Protocol):
    """A model runtime. Methods are blocking; the engine calls them off the event loop, except `tokenize`."""

    def load(self) -> BackendInfo: ...

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, not truncated. Thread-safe and without locks:
        the engine calls it on the event loop for short chunks and on its tokenizer thread for long ones,
        possibly at once (engine/tokenize.py; tokenization.HfTokenizer is such a tokenizer)."""
        ...

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One row per sequence: float32, shape (len(batch), dimension), each row of unit L2 norm."""
        ...

    def close(self) -> None: ...


def first_line(exc: BaseException) -> str:
    """An exception in one line (runtimes raise multi-page messages), for a load error a user reads."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
