"""The Hugging Face tokenizer every backend uses, so that text becomes the same token ids on every engine.

The engine tokenises once and hands ids to `Backend.embed`; vLLM receives those ids as-is, so its own
tokenizer never runs on request text.

Calls come from two threads (the engine tokenises short requests on the event loop and long ones on its
tokenizer thread), so a call must be thread-safe and must not wait for the other thread. transformers'
`__call__` is neither: it re-applies truncation and padding settings on the shared Rust tokenizer on every
call (two threads at once fail with "Already borrowed"), and it costs ~40% more than the Rust encode on a
short text. So texts go straight to a private copy of the Rust tokenizer, without truncation or padding,
once it has been checked to give transformers' ids on a set of probe texts; where it does not (a slow
tokenizer, or one whose Python side adds something), each thread gets its own copy of the transformers one.

A checked Rust tokenizer can be saved (`HfTokenizer.state`) and served later as a `SavedTokenizer`, which
needs only the `tokenizers` package: importing transformers imports torch too (~500 MB of resident memory),
which an engine that runs no torch (openvino, on a cached export) should not pay.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ..base import TRANSFORMERS_BUILD

__all__ = ["PROBES", "HfTokenizer", "SavedTokenizer", "TokenizerHolder", "rust_copy", "rust_ids",
           "special_tokens_added", "transformers_ids"]

log = logging.getLogger("embedding_service")

# Texts on which the direct encoder must agree with transformers before it is used.
PROBES = (
    "hello world",
    "Ünïcödé façade — 東京タワー 😀 naïve ﬁ",
    "[CLS] <s> </s> <|endoftext|> [SEP] <pad> [MASK]",
    "  leading, trailing\t\ttabs\n\nand newlines  ",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery: what is BM25?",
    "word " * 600,
    "",
)


def special_tokens_added(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids a tokenizer's post-processor puts before and after every text."""
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    return (), ()


def transformers_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def rust_copy(tokenizer: Any) -> Any | None:
    """A private copy of a fast transformers tokenizer's Rust tokenizer, without truncation or padding (so that
    threads share it safely), or None for a slow one. Callers check its ids against transformers' first."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    from tokenizers import Tokenizer

    direct = Tokenizer.from_str(backend.to_str())
    direct.no_truncation()
    direct.no_padding()
    return direct


def _direct_encoder(tokenizer: Any) -> Any | None:
    """A private Rust tokenizer giving transformers' ids, or None where it would not."""
    try:
        direct = rust_copy(tokenizer)
        same = direct is not None and ([e.ids for e in direct.encode_batch(list(PROBES))]
                                       == transformers_ids(tokenizer, PROBES))
    except Exception as exc:  # any surprise: the transformers path is always right
        log.debug("direct tokenizer unavailable: %s", exc)
        return None
    return direct if same else None


def rust_ids(direct: Any, texts: Sequence[str]) -> list[list[int]]:
    if len(texts) == 1:
        return [direct.encode(texts[0], add_special_tokens=True).ids]
    return [e.ids for e in direct.encode_batch(list(texts), add_special_tokens=True)]


class HfTokenizer:
    """`AutoTokenizer` of a model directory: untruncated ids with special tokens, plus what those are."""

    def __init__(self, model_dir: str) -> None:
        with TRANSFORMERS_BUILD:  # (backends/base.py)
            from transformers import AutoTokenizer

            self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.special_prefix, self.special_suffix = special_tokens_added(self.tokenizer)
        self._direct = _direct_encoder(self.tokenizer)
        self._per_thread = threading.local()
        if self._direct is None:
            log.info("tokenizer of %s: transformers' path (the direct Rust encoder differs from it)", model_dir)

    @property
    def direct(self) -> bool:
        """True when texts go straight to the Rust tokenizer."""
        return self._direct is not None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """The id padded rows carry: the pad token, else end-of-sequence (decoders), else 0."""
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def state(self) -> dict[str, Any] | None:
        """What a `SavedTokenizer` needs to give these same ids; None when texts take transformers' path."""
        if self._direct is None:
            return None
        return {"tokenizer": self._direct.to_str(), "special_prefix": list(self.special_prefix),
                "special_suffix": list(self.special_suffix), "vocab_size": self.vocab_size, "pad_id": self.pad_id}

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens included (/detokenize)."""
        if self._direct is not None:
            return str(self._direct.decode(list(ids), skip_special_tokens=False))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (/tokenize's token_strs)."""
        if self._direct is not None:
            return [str(self._direct.id_to_token(i)) for i in ids]
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(ids))]

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if self._direct is not None:
            return rust_ids(self._direct, texts)
        own = getattr(self._per_thread, "tokenizer", None)
        if own is None:
            own = self._per_thread.tokenizer = copy.deepcopy(self.tokenizer)
        return transformers_ids(own, texts)


class SavedTokenizer:
    """An `HfTokenizer`'s checked Rust encoder, from its `state()`, without importing transformers."""

    def __init__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self._state = state
        self._direct = Tokenizer.from_str(state["tokenizer"])
        self.special_prefix = tuple(int(i) for i in state["special_prefix"])
        self.special_suffix = tuple(int(i) for i in state["special_suffix"])
        self.vocab_size = int(state["vocab_size"])
        self.pad_id = int(state["pad_id"])

    def state(self) -> dict[str, Any]:
        return self._state

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        return rust_ids(self._direct, texts)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._direct.decode(list(ids), skip_special_tokens=False))

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [str(self._direct.id_to_token(i)) for i in ids]


class TokenizerHolder:
    """`decoder` and `tokenize` of a backend whose loaded tokenizer (HfTokenizer, SavedTokenizer) is
    `self._tokenizer`: the same two members for every engine that tokenises with one."""

    _tokenizer: Any = None

    @property
    def decoder(self) -> Any:
        """The tokenizer, for /tokenize's token strings and /detokenize (None before load)."""
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer(texts)  # type: ignore[no-any-return]
