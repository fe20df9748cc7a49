"""What a reranker is, from its model folder's facts (model_facts.py), and how its logits become scores:
shared by every engine (how a pair becomes token ids: pair_tokenizer.py).

Two kinds of reranker:
- "yes-no" (Qwen3-Reranker): a causal LM prompted with the model card's template; the score is
  p(yes) = softmax(logit_no, logit_yes)[yes] at the last position.
- "cross-encoder" (sentence-transformers CrossEncoder, BERT-style *ForSequenceClassification with one
  label): [CLS] query [SEP] document [SEP] with token types 0/1, and the model's own activation on its logit.
Nothing here imports torch, so the engine and API can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .base import BackendLoadError
from .model.facts import ModelFacts

__all__ = [
    "QWEN3_DEFAULT_INSTRUCTION",
    "QWEN3_PREFIX",
    "QWEN3_SUFFIX",
    "RerankerFacts",
    "activate",
    "format_qwen3_pair",
    "reranker_facts",
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


def reranker_facts(facts: ModelFacts) -> RerankerFacts:
    """Which kind of reranker the folder of `facts` holds; BackendLoadError (saying why) when it is none we
    serve."""
    root = Path(facts.model_dir or "")
    if not facts.config_found:
        raise BackendLoadError(f"cannot read {root / 'config.json'}")
    model_type = facts.model_type or ""
    architectures = list(facts.architectures)
    positions = facts.max_position_embeddings
    if any(a.endswith("ForSequenceClassification") for a in architectures) and model_type not in _YES_NO_MODEL_TYPES:
        if facts.num_labels != 1:
            raise BackendLoadError(f"{root} is a classifier with {facts.num_labels} labels; a reranker has one "
                                   "relevance logit (num_labels 1)")
        return RerankerFacts("cross-encoder", model_type, _activation(facts.activation_fn, root), positions)
    if model_type in _YES_NO_MODEL_TYPES and any(a.endswith("ForCausalLM") for a in architectures):
        if facts.has_modules:
            raise BackendLoadError(f"{root} is a sentence-transformers embedding model (it has modules.json), "
                                   "not a reranker: serve it as the embedding model")
        return RerankerFacts("yes-no", model_type, "sigmoid", positions)
    raise BackendLoadError(f"{root} ({model_type or 'unknown type'}, {architectures or 'no architectures'}) is "
                           "not a reranker this server runs: Qwen3-Reranker (Qwen3ForCausalLM) or a "
                           "one-label *ForSequenceClassification cross-encoder")


def _activation(name: str | None, root: Path) -> str:
    """sentence-transformers' choice: config's activation_fn, else sigmoid for one label."""
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
