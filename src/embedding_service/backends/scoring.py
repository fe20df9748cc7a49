"""What a reranker is and how a (query, document) pair becomes token ids: shared by the torch and vLLM engines.

Two kinds of reranker:
- "yes-no" (Qwen3-Reranker): a causal LM prompted with the model card's template; the score is
  p(yes) = softmax(logit_no, logit_yes)[yes] at the last position.
- "cross-encoder" (sentence-transformers CrossEncoder, BERT-style *ForSequenceClassification with one
  label): [CLS] query [SEP] document [SEP] with token types 0/1, and the model's own activation on its logit.
Nothing here imports torch, so the engine and API can use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .base import BackendLoadError, BackendOptions

__all__ = [
    "QWEN3_DEFAULT_INSTRUCTION",
    "QWEN3_PREFIX",
    "QWEN3_SUFFIX",
    "PairMethods",
    "PairTokenizer",
    "RerankerFacts",
    "TokenPair",
    "activate",
    "create_scoring_backend",
    "format_qwen3_pair",
    "read_reranker_facts",
    "token_types",
    "yes_probability",
]

RerankerKind = Literal["yes-no", "cross-encoder"]

# From the Qwen3-Reranker model card (transformers usage), verbatim.
QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_YES_NO_MODEL_TYPES = {"qwen3"}
# sentence-transformers activation names (config.json) we compute ourselves, without importing them.
_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
}


def format_qwen3_pair(query: str, document: str, instruction: str | None = None) -> str:
    """The card's `format_instruction`: the user turn between QWEN3_PREFIX and QWEN3_SUFFIX."""
    instruction = QWEN3_DEFAULT_INSTRUCTION if instruction is None else instruction
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


@dataclass(frozen=True)
class RerankerFacts:
    """How a model folder scores a pair, read from its files once."""

    kind: RerankerKind
    model_type: str
    activation: str = "sigmoid"  # cross-encoder only: sigmoid, identity or tanh
    max_positions: int | None = None

    def length_limit(self, configured: int) -> int:
        """`configured` (max_model_len), lowered to the positions the model has."""
        return min(configured, self.max_positions or configured)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def read_reranker_facts(model_dir: str | Path) -> RerankerFacts:
    """Which kind of reranker `model_dir` holds; BackendLoadError (saying why) when it is none we serve."""
    root = Path(model_dir)
    config = _read_json(root / "config.json")
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    positions = config.get("max_position_embeddings")
    positions = positions if isinstance(positions, int) and positions > 0 else None
    if any(a.endswith("ForSequenceClassification") for a in architectures) and model_type not in _YES_NO_MODEL_TYPES:
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if labels != 1:
            raise BackendLoadError(f"{root} is a classifier with {labels} labels; a reranker has one "
                                   "relevance logit (num_labels 1)")
        return RerankerFacts("cross-encoder", model_type, _activation(config, root), positions)
    if model_type in _YES_NO_MODEL_TYPES and any(a.endswith("ForCausalLM") for a in architectures):
        if (root / "modules.json").is_file():
            raise BackendLoadError(f"{root} is a sentence-transformers embedding model (it has modules.json), "
                                   "not a reranker: serve it as the embedding model")
        return RerankerFacts("yes-no", model_type, "sigmoid", positions)
    raise BackendLoadError(f"{root} ({model_type or 'unknown type'}, {architectures or 'no architectures'}) is "
                           "not a reranker this server runs: Qwen3-Reranker (Qwen3ForCausalLM) or a "
                           "one-label *ForSequenceClassification cross-encoder")


def _activation(config: dict[str, Any], root: Path) -> str:
    """sentence-transformers' choice: config's activation_fn, else sigmoid for one label."""
    st = config.get("sentence_transformers")
    name = st.get("activation_fn") if isinstance(st, dict) else None
    name = name or config.get("sbert_ce_default_activation_function")
    if not name:
        return "sigmoid"
    if name not in _ACTIVATIONS:
        raise BackendLoadError(f"{root}: activation {name!r} is not one we compute "
                               f"({', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """A cross-encoder's logits to scores, as float32."""
    x = np.asarray(logits, dtype=np.float64)
    if activation == "sigmoid":
        out = 1.0 / (1.0 + np.exp(-x))
    elif activation == "tanh":
        out = np.tanh(x)
    else:
        out = x
    return out.astype(np.float32)


def yes_probability(logit_no: float, logit_yes: float) -> float:
    """softmax([no, yes])[yes], computed stably."""
    return 1.0 / (1.0 + math.exp(logit_no - logit_yes))


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


class PairTokenizer:
    """Query/document pairs to TokenPairs, exactly as each kind's reference tokenizes them."""

    def __init__(self, model_dir: str, facts: RerankerFacts) -> None:
        from transformers import AutoTokenizer

        self.facts = facts
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc
        self.yes_id = self.no_id = -1
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        if facts.kind == "yes-no":
            ids: list[Any] = [self.tokenizer.convert_tokens_to_ids(token) for token in ("no", "yes")]
            if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
                raise BackendLoadError(f"{model_dir}: the tokenizer has no single 'yes'/'no' tokens to score")
            self.no_id, self.yes_id = ids
            self._prefix = self._plain(QWEN3_PREFIX)
            self._suffix = self._plain(QWEN3_SUFFIX)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

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
        bodies = self.tokenizer(texts, add_special_tokens=True, truncation=False, padding=False,
                                return_attention_mask=False, verbose=False)["input_ids"]
        heads = {q: len(self._prefix) + len(self._plain(format_qwen3_pair(q, "", instruction)))
                 for q in dict.fromkeys(queries)}
        tail = len(self._suffix)
        return [TokenPair([*self._prefix, *body, *self._suffix], head=heads[q], tail=tail)
                for q, body in zip(queries, bodies, strict=True)]

    def _cross(self, queries: Sequence[str], documents: Sequence[str]) -> list[TokenPair]:
        encoded = self.tokenizer(list(queries), list(documents), truncation=False, padding=False,
                                 return_attention_mask=False, return_token_type_ids=True, verbose=False)
        closing = self._closing_tokens()
        pairs = []
        for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True):
            start = types.index(1) if 1 in types else len(ids)
            pairs.append(TokenPair(ids, head=start, tail=closing, second_start=start))
        return pairs

    def _closing_tokens(self) -> int:
        """How many special tokens follow the second text of a pair (BERT: the final [SEP])."""
        pair = len(self.tokenizer("x", "y")["input_ids"])
        return max(0, pair - len(self.tokenizer("x")["input_ids"]) - len(self._plain("y")))

    def texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain texts (for counting tokens of a text alone)."""
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False,
                                 return_attention_mask=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]


class PairMethods:
    """The tokenising half of a scoring backend, shared by the torch and vLLM ones (set `pairs` in load)."""

    pairs: PairTokenizer | None = None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        assert self.pairs is not None, "load() first"
        return self.pairs.texts(texts)

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instruction: str | None = None) -> list[TokenPair]:
        assert self.pairs is not None, "load() first"
        return self.pairs(queries, documents, instruction)


def create_scoring_backend(engine: str, options: BackendOptions) -> Any:
    """Build (not load) the reranker backend for `engine` ("torch", "vllm", "openvino" or "fake")."""
    if engine == "fake":
        from .fake_scoring import FakeScoringBackend

        return FakeScoringBackend(model=options.model_label, max_model_len=options.max_model_len,
                                  record_batches=False)
    if engine == "vllm":
        from .vllm_scoring import VllmScoringBackend

        return VllmScoringBackend(options)
    if engine == "openvino":
        from .openvino_scoring import OpenVinoScoringBackend

        return OpenVinoScoringBackend(options)
    if engine != "torch":
        raise BackendLoadError(f"the {engine} engine cannot serve a reranker (use torch, vllm or openvino)")
    from .torch_scoring import TorchScoringBackend

    return TorchScoringBackend(options)
