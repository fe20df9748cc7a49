"""How a (query, document) pair becomes token ids, exactly as each kind of reranker's reference tokenizes it.

The reference is transformers' tokenizer (the Qwen3-Reranker card's recipe, `CrossEncoder.predict`). Where a
private Rust copy of it (tokenization.rust_copy) gives the same ids on probe texts and pairs, pairs go through
that copy: it is safe to share between threads, cheaper, and it can be saved (`state()`) and rebuilt
(`from_state`) with the `tokenizers` package alone, so that a reranker started from an openvino export imports
neither transformers nor torch. Where it differs, transformers' own calls run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..base import TRANSFORMERS_BUILD, Backend, BackendLoadError
from ..scoring import QWEN3_PREFIX, QWEN3_SUFFIX, RerankerFacts, format_qwen3_pair
from .tokenization import PROBES, rust_copy, rust_ids, transformers_ids

__all__ = ["PairBackend", "PairMethods", "PairTokenizer", "TokenPair", "token_types"]

log = logging.getLogger("embedding_service")

Ids = list[int]


class TokenPair(list[int]):
    """A pair's token ids, plus what truncation must keep and where the second segment starts.

    `head`: leading tokens that hold the query (never cut); `tail`: closing tokens (kept after a cut);
    `second_start`: index of the first token of token type 1 (cross-encoders), None for one segment.
    """

    head: int
    tail: int
    second_start: int | None

    def __init__(self, ids: Sequence[int], *, head: int, tail: int, second_start: int | None = None) -> None:
        super().__init__(ids)
        self.head, self.tail, self.second_start = head, tail, second_start

    def truncated(self, limit: int) -> TokenPair | None:
        """The pair cut to `limit` tokens by dropping the document's end; None if the query alone is too long."""
        if len(self) <= limit:
            return self
        if self.head + self.tail > limit:
            return None
        ids = [*self[: limit - self.tail], *self[len(self) - self.tail:]]
        return TokenPair(ids, head=self.head, tail=self.tail, second_start=self.second_start)


def token_types(batch: Sequence[Sequence[int]], width: int, *, left: bool = False) -> np.ndarray:
    """int64 token types of a batch padded to `width` (on the left if `left`): 1 from each pair's second
    segment to its end, 0 elsewhere (padding included)."""
    types = np.zeros((len(batch), width), dtype=np.int64)
    for row, seq in enumerate(batch):
        second = seq.second_start if isinstance(seq, TokenPair) else None
        if second is not None:
            start = width - len(seq) if left else 0
            types[row, start + second: start + len(seq)] = 1
    return types


class _TransformersPairs:
    """transformers' own calls: the reference, and the path where the Rust copy differs from it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def plain(self, text: str) -> Ids:
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def texts(self, texts: Sequence[str]) -> list[Ids]:
        return transformers_ids(self.tokenizer, texts)

    def pairs(self, queries: Sequence[str], documents: Sequence[str]) -> list[tuple[Ids, Ids]]:
        encoded = self.tokenizer(list(queries), list(documents), truncation=False, padding=False,
                                 return_attention_mask=False, return_token_type_ids=True, verbose=False)
        return [(list(ids), list(types))
                for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True)]


class _RustPairs:
    """The same three calls on a Rust tokenizer (no truncation, no padding)."""

    def __init__(self, direct: Any) -> None:
        self.direct = direct

    def plain(self, text: str) -> Ids:
        return list(self.direct.encode(text, add_special_tokens=False).ids)

    def texts(self, texts: Sequence[str]) -> list[Ids]:
        return rust_ids(self.direct, texts)

    def pairs(self, queries: Sequence[str], documents: Sequence[str]) -> list[tuple[Ids, Ids]]:
        encoded = self.direct.encode_batch(list(zip(queries, documents, strict=True)), add_special_tokens=True)
        return [(list(e.ids), list(e.type_ids)) for e in encoded]


def _checked_rust(tokenizer: Any) -> _RustPairs | None:
    """A Rust copy of `tokenizer` that gives transformers' ids on the probes (texts, templated Qwen3 turns,
    pairs, with and without special tokens), or None."""
    try:
        direct = rust_copy(tokenizer)
        if direct is None:
            return None
        rust, reference = _RustPairs(direct), _TransformersPairs(tokenizer)
        queries, documents = list(PROBES), list(reversed(PROBES))
        texts = [*PROBES, QWEN3_PREFIX, QWEN3_SUFFIX,
                 *(format_qwen3_pair(q, d) for q, d in zip(queries, documents, strict=True))]
        same = (rust.texts(texts) == reference.texts(texts)
                and [rust.plain(t) for t in texts] == [reference.plain(t) for t in texts]
                and rust.pairs(queries, documents) == reference.pairs(queries, documents))
    except Exception as exc:  # any surprise: the transformers path is always right
        log.debug("direct pair tokenizer unavailable: %s", exc)
        return None
    return rust if same else None


class PairTokenizer:
    """Query/document pairs to TokenPairs, exactly as each kind's reference tokenizes them.

    Build it with `load` (from the model folder, through transformers) or `from_state` (a saved `state()`).
    """

    def __init__(self, encoding: _RustPairs | _TransformersPairs, facts: RerankerFacts, *, vocab_size: int,
                 pad_id: int, yes_id: int = -1, no_id: int = -1) -> None:
        self.facts = facts
        self._encoding = encoding
        self.vocab_size, self.pad_id, self.yes_id, self.no_id = vocab_size, pad_id, yes_id, no_id
        yes_no = facts.kind == "yes-no"
        self._prefix = encoding.plain(QWEN3_PREFIX) if yes_no else []
        self._suffix = encoding.plain(QWEN3_SUFFIX) if yes_no else []
        self._closing = 0 if yes_no else self._closing_tokens()

    @classmethod
    def load(cls, model_dir: str, facts: RerankerFacts) -> PairTokenizer:
        try:
            with TRANSFORMERS_BUILD:  # (backends/base.py)
                from transformers import AutoTokenizer

                tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc
        yes_id = no_id = -1
        if facts.kind == "yes-no":
            ids: list[Any] = [tokenizer.convert_tokens_to_ids(token) for token in ("no", "yes")]
            if any(i is None or i == tokenizer.unk_token_id for i in ids):
                raise BackendLoadError(f"{model_dir}: the tokenizer has no single 'yes'/'no' tokens to score")
            no_id, yes_id = ids
        encoding = _checked_rust(tokenizer)
        if encoding is None:
            log.info("reranker tokenizer of %s: transformers' path (the direct Rust encoder differs from it)",
                     model_dir)
        pad = tokenizer.pad_token_id
        return cls(encoding or _TransformersPairs(tokenizer), facts, vocab_size=len(tokenizer),
                   pad_id=pad if pad is not None else 0, yes_id=yes_id, no_id=no_id)

    @classmethod
    def from_state(cls, state: dict[str, Any], facts: RerankerFacts) -> PairTokenizer:
        """The tokenizer a `state()` describes, with the `tokenizers` package only."""
        from tokenizers import Tokenizer

        if state.get("kind") != facts.kind:
            raise ValueError(f"saved for a {state.get('kind')} reranker, not a {facts.kind} one")
        return cls(_RustPairs(Tokenizer.from_str(state["tokenizer"])), facts, vocab_size=int(state["vocab_size"]),
                   pad_id=int(state["pad_id"]), yes_id=int(state["yes_id"]), no_id=int(state["no_id"]))

    def state(self) -> dict[str, Any] | None:
        """What `from_state` needs to give these same ids; None when pairs take transformers' path."""
        if not isinstance(self._encoding, _RustPairs):
            return None
        return {"tokenizer": self._encoding.direct.to_str(), "kind": self.facts.kind, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "yes_id": self.yes_id, "no_id": self.no_id}

    @property
    def direct(self) -> bool:
        """True when pairs go straight to the Rust tokenizer."""
        return isinstance(self._encoding, _RustPairs)

    def __call__(self, queries: Sequence[str], documents: Sequence[str],
                 instruction: str | None = None) -> list[TokenPair]:
        """Untruncated pairs (queries[i], documents[i]); the engine applies the length policy."""
        if self.facts.kind == "yes-no":
            return self._yes_no(queries, documents, instruction)
        return self._cross(queries, documents)

    def _yes_no(self, queries: Sequence[str], documents: Sequence[str], instruction: str | None) -> list[TokenPair]:
        # As the card: tokenize the formatted user turn (special tokens as the tokenizer adds them), then
        # wrap it in the prefix and suffix ids. Each query's part is measured once, for the truncation floor.
        texts = [format_qwen3_pair(q, doc, instruction) for q, doc in zip(queries, documents, strict=True)]
        bodies = self._encoding.texts(texts)
        heads = {q: len(self._prefix) + len(self._encoding.plain(format_qwen3_pair(q, "", instruction)))
                 for q in dict.fromkeys(queries)}
        tail = len(self._suffix)
        return [TokenPair([*self._prefix, *body, *self._suffix], head=heads[q], tail=tail)
                for q, body in zip(queries, bodies, strict=True)]

    def _cross(self, queries: Sequence[str], documents: Sequence[str]) -> list[TokenPair]:
        pairs = []
        for ids, types in self._encoding.pairs(queries, documents):
            start = types.index(1) if 1 in types else len(ids)
            pairs.append(TokenPair(ids, head=start, tail=self._closing, second_start=start))
        return pairs

    def _closing_tokens(self) -> int:
        """How many special tokens follow the second text of a pair (BERT: the final [SEP])."""
        pair = len(self._encoding.pairs(["x"], ["y"])[0][0])
        return max(0, pair - len(self._encoding.texts(["x"])[0]) - len(self._encoding.plain("y")))

    def texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain texts (for counting tokens of a text alone)."""
        return self._encoding.texts(texts)


class PairBackend(Backend, Protocol):
    """A backend that scores pairs: it also turns (query, document) pairs into token sequences."""

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instruction: str | None = None) -> list[TokenPair]: ...


class PairMethods:
    """The tokenising half of a scoring backend, shared by every engine's (set `pairs` in load)."""

    pairs: PairTokenizer | None = None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        assert self.pairs is not None, "load() first"
        return self.pairs.texts(texts)

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instruction: str | None = None) -> list[TokenPair]:
        assert self.pairs is not None, "load() first"
        return self.pairs(queries, documents, instruction)
