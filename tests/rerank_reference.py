"""Reference scores for the fidelity tests: the Qwen3-Reranker model card's transformers code, verbatim
in substance (left padding, full logits, log_softmax over [no, yes]), and sentence-transformers'
CrossEncoder.predict. Also documents of chosen token lengths."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from embedding_service.backends.scoring import QWEN3_PREFIX, QWEN3_SUFFIX, format_qwen3_pair

__all__ = ["CardQwen3Reranker", "cross_encoder_predict", "documents_of_lengths"]


class CardQwen3Reranker:
    def __init__(self, model_dir: Path, max_length: int = 8192) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        self.prefix_tokens = self.tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)

    def process_inputs(self, pairs: list[str]) -> Any:
        inputs = self.tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        return self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)

    def scores(self, query: str, documents: list[str], instruction: str | None = None) -> list[float]:
        import torch

        pairs = [format_qwen3_pair(query, doc, instruction) for doc in documents]
        with torch.no_grad():
            batch_scores = self.model(**self.process_inputs(pairs)).logits[:, -1, :]
            true_vector = batch_scores[:, self.token_true_id]
            false_vector = batch_scores[:, self.token_false_id]
            batch_scores = torch.stack([false_vector, true_vector], dim=1)
            batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
            return batch_scores[:, 1].exp().tolist()  # type: ignore[no-any-return]


def cross_encoder_predict(model_dir: Path, query: str, documents: list[str]) -> list[float]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    return [float(s) for s in model.predict([(query, doc) for doc in documents], batch_size=1)]


def documents_of_lengths(tokenizer: Any, lengths: list[int], seed: int = 0) -> list[str]:
    """One pseudo-word document per wanted length, cut to about that many tokens."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(1, 3)))
             for _ in range(4000)]
    docs = []
    for n in lengths:
        text = " ".join(rng.choice(words) for _ in range(n))
        ids = tokenizer.encode(text, add_special_tokens=False)[:n]
        docs.append(tokenizer.decode(ids))
    return docs
