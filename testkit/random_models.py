"""Offline stand-ins for real models: a random-weight Qwen3 embedding model with a trained tokenizer.

Used by the tests (a tiny one) and the benchmark (the full Qwen3-Embedding-0.6B shape; random weights cost
the same compute). Needs torch, transformers and tokenizers; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

__all__ = [
    "OUTLIER_CHANNELS",
    "QWEN3_0_6B_SHAPE",
    "TINY_QWEN3_SHAPE",
    "build_random_colbert",
    "build_random_cross_encoder",
    "build_random_qwen3",
    "build_random_qwen3_reranker",
    "generated_corpus",
    "tensor_digest",
]

TINY_QWEN3_SHAPE: dict[str, int] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
}

# Four residual channels of TINY_QWEN3_SHAPE's 128, x20 to x100, one in each group of 32 channels (OpenVINO's
# dynamic quantisation scales activations per group of 32, so every group holds an outlier).
OUTLIER_CHANNELS: dict[int, float] = {5: 20.0, 40: 40.0, 77: 60.0, 110: 100.0}

# From the Qwen3-Embedding-0.6B model card / config.json.
QWEN3_0_6B_SHAPE: dict[str, int] = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
}

_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ei")]


def generated_corpus(words: int = 300_000, seed: int = 0) -> list[str]:
    """Sentences of pseudo-words (plus digits and punctuation), varied enough for a 32k+ BPE vocabulary."""
    rng = random.Random(seed)
    lines: list[str] = []
    line: list[str] = []
    for _ in range(words):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.05:
            word = str(rng.randint(0, 99999))
        if rng.random() < 0.1:
            word = word.capitalize()
        line.append(word + (rng.choice(",.;:!?") if rng.random() < 0.08 else ""))
        if len(line) >= rng.randint(8, 30):
            lines.append(" ".join(line))
            line = []
    return lines


def _train_tokenizer(vocab_size: int, seed: int, *, reranker: bool = False, words: int = 300_000) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = generated_corpus(words, seed=seed)
    if reranker:  # Qwen3's chat/think tokens, and "yes"/"no" as the plain tokens the reranker scores
        specials += ["<think>", "</think>"]
        corpus += ["yes", "no", "yes no", "no yes"] * 500
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if reranker:  # the real Qwen3-Reranker tokenizer adds nothing around a text
        return tokenizer
    eot = tokenizer.token_to_id("<|endoftext|>")
    # As the real Qwen3-Embedding tokenizer: <|endoftext|> closes every text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eot)])
    return tokenizer


def build_random_qwen3(out_dir: str | Path, *, shape: dict[str, int] | None = None, vocab_size: int = 32768,
                       max_position_embeddings: int = 32768, seed: int = 0,
                       dtype: str = "float32", outlier_channels: dict[int, float] | None = None,
                       compensate_outliers: bool = False) -> Path:
    """Write a random-weight Qwen3 embedding model (sentence-transformers layout) to `out_dir`.

    `outlier_channels` ({hidden channel: factor}) gives it what trained LLMs have and random weights lack: a few
    hidden channels 20-100x the others at the input of every linear layer (LLM.int8(), SmoothQuant), which is
    what int8 activations quantised per tensor, token or group must survive. The channels' weights in every
    layer's two RMSNorms are scaled by the factor, so the norms' outputs (the inputs of q/k/v and gate/up)
    carry them and the layers' outputs mix them into the residual stream. (Scaling the embedding columns
    instead puts the outliers in the int8-compressed embedding table, whose per-row scale then breaks the
    weights before any activation is quantised: a weaker test of activation quantisation.)

    With `compensate_outliers`, the linear layers' input columns of those channels are divided by the factor
    (and up_proj's rows multiplied, down_proj's columns divided, for outliers at down_proj's input too): the
    model computes what the plain one does, with the outliers in its activations and small weight columns
    against them, as trained models have them. Without it, 28 layers of random weights amplify the scaled
    channels into a model that no perturbation leaves alone (the full-size shape run in bf16 falls to min cos
    0.79 against fp32), which no int8 scheme can be judged on.
    """
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(vocab_size, seed)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", model_max_length=max_position_embeddings)
    tokenizer.save_pretrained(out)
    dims: dict[str, Any] = {**TINY_QWEN3_SHAPE, **(shape or {})}
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        architectures=["Qwen3ForCausalLM"],
        **dims,
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config)
    with torch.no_grad():  # the pad row starts all-zero; give it values like any other token
        model.embed_tokens.weight[tokenizer.pad_token_id].normal_(0.0, config.initializer_range)
        for channel, factor in (outlier_channels or {}).items():
            layer: Any
            for layer in model.layers:
                layer.input_layernorm.weight[channel] *= factor
                layer.post_attention_layernorm.weight[channel] *= factor
                if compensate_outliers:
                    attention, mlp = layer.self_attn, layer.mlp
                    for proj in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                        proj.weight[:, channel] /= factor
                    mlp.up_proj.weight[channel, :] *= factor  # (SwiGLU is linear in up: down's input scales)
                    mlp.down_proj.weight[:, channel] /= factor
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    config.dtype = dtype
    config.save_pretrained(out)
    _write_st_files(out)
    return out


def _write_st_files(out: Path) -> None:
    """modules.json + last-token pooling + Normalize + Qwen3's prompts, as the real model ships them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": json.loads((out / "config.json").read_text())["hidden_size"],
        "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True}, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the "
                             "query\nQuery:", "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))


def build_random_qwen3_reranker(out_dir: str | Path, *, shape: dict[str, int] | None = None,
                                vocab_size: int = 8192, max_position_embeddings: int = 32768, seed: int = 0,
                                dtype: str = "float32", spread: float = 1.0, corpus_words: int = 100_000) -> Path:
    """A random-weight Qwen3-Reranker look-alike: a Qwen3 causal LM (tied embeddings, as the 0.6B) whose
    tokenizer has the chat tokens, <think>, and "yes"/"no" as single tokens; no sentence-transformers files.

    Random weights give the same p(yes) for every document: `spread` scales the attention (so the last
    position depends on the document) and the "yes"/"no" rows (so that dependence shows in the score).
    """
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(vocab_size, seed, reranker=True, words=corpus_words)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", model_max_length=max_position_embeddings)
    tokenizer.save_pretrained(out)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    assert tokenizer.unk_token_id not in (yes, no) and None not in (yes, no), "yes/no must be single tokens"
    config = Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), architectures=["Qwen3ForCausalLM"],
        **{**TINY_QWEN3_SHAPE, **(shape or {})},  # type: ignore[arg-type]
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj):
                proj.weight.mul_(4.0 * spread)
        model.model.embed_tokens.weight[[yes, no]] *= 3.0 * spread
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    config.dtype = dtype
    config.save_pretrained(out)
    return out


def _bert_tokenizer_copy(out_dir: str | Path, vocab_dir: str | Path) -> tuple[Path, int]:
    """`out_dir` made, with the WordPiece tokenizer files of `vocab_dir` in it, and that vocabulary's size."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(vocab_dir) / name).is_file():
            shutil.copy(Path(vocab_dir) / name, out / name)
    return out, sum(1 for _ in (Path(vocab_dir) / "vocab.txt").open(encoding="utf-8"))


def build_random_cross_encoder(out_dir: str | Path, vocab_dir: str | Path, *, seed: int = 0,
                               activation: str | None = None, hidden_size: int = 128,
                               max_position_embeddings: int = 512, classifier_scale: float = 1.0,
                               num_hidden_layers: int = 2, num_attention_heads: int = 4) -> Path:
    """A random-weight BERT cross-encoder (BertForSequenceClassification, one label) on the WordPiece
    vocabulary in `vocab_dir` (all-MiniLM-L6-v2's). `activation` is written where sentence-transformers
    reads it (config.json's sentence_transformers.activation_fn); None leaves its default (sigmoid).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out, vocab = _bert_tokenizer_copy(out_dir, vocab_dir)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=hidden_size * 2,
                        max_position_embeddings=max_position_embeddings,
                        architectures=["BertForSequenceClassification"])
    config.num_labels = 1
    if activation is not None:
        config.sentence_transformers = {"activation_fn": activation}
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:  # sharper attention: the [CLS] state depends on the text
            attention: Any = layer.attention
            attention.self.query.weight.mul_(4.0)
            attention.self.key.weight.mul_(4.0)
        # The pooled [CLS] states of all texts share a large common part: take it out of the classifier and
        # scale what is left, so that logits spread around 0 (scores differ by document) instead of all
        # saturating at the same value.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out))
        probes = tokenizer(["what is the capital of china", "gravity", "how do plants grow"] * 2,
                           ["beijing is the capital", "an apple falls from the tree", "photosynthesis needs light",
                            "the weather is nice today", "china has many cities", "leaves are green"],
                           padding=True, return_tensors="pt")
        pooled = model.eval().bert(**probes).pooler_output
        weight, mean = model.classifier.weight[0], pooled.mean(0)
        weight -= (weight @ mean) / (mean @ mean) * mean
        weight *= classifier_scale / float((pooled @ weight).std())
        model.classifier.bias.zero_()
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_random_splade(out_dir: str | Path, vocab_dir: str | Path, *, seed: int = 0, hidden_size: int = 64,
                        max_position_embeddings: int = 512) -> Path:
    """A random-weight BERT masked-LM (BertForMaskedLM) on the WordPiece vocabulary in `vocab_dir`
    (all-MiniLM-L6-v2's), the shape of a SPLADE model: sentence-transformers' SparseEncoder loads the folder
    as Transformer(fill-mask) + SpladePooling. The output projection is untied and scaled and its bias set
    low, so that logits spread (vectors differ by text) and most are below zero (vectors are sparse)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out, vocab = _bert_tokenizer_copy(out_dir, vocab_dir)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=hidden_size * 2, max_position_embeddings=max_position_embeddings,
                        tie_word_embeddings=False, architectures=["BertForMaskedLM"])
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:  # sharper attention: each token's state depends on the text
            attention: Any = layer.attention
            attention.self.query.weight.mul_(4.0)
            attention.self.key.weight.mul_(4.0)
        decoder = model.cls.predictions.decoder
        decoder.weight.normal_(0.0, 2.0 / hidden_size**0.5)  # logits of spread ~2 from unit-scale states
        for bias in (decoder.bias, model.cls.predictions.bias):  # (one parameter or two, by version)
            bias.fill_(-6.0)
    model.save_pretrained(out)
    return out


def build_random_colbert(out_dir: str | Path, vocab_dir: str | Path, *, seed: int = 0, hidden_size: int = 64,
                         embedding_size: int = 32, query_length: int = 16, document_length: int = 48) -> Path:
    """A random-weight ColBERT model in PyLate's layout, on the WordPiece vocabulary in `vocab_dir`
    (all-MiniLM-L6-v2's): a BERT encoder (Transformer), a projection without bias (pylate.models.Dense) and
    config_sentence_transformers.json with PyLate's defaults ([Q] / [D] markers added to the tokenizer as PyLate
    adds them, query expansion, punctuation skip-list) and short query/document lengths.

    The weights come from numpy's generator (not torch's initialisers), so the folder's tensors are the same
    under any torch/transformers version: tests/data/colbert_reference.json was computed by PyLate, in a venv of
    its own (scripts/colbert_reference.py), on exactly these tensors."""
    import string

    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    tokenizer.add_tokens(["[Q] ", "[D] "])  # as PyLate's ColBERT() does on a base encoder
    tokenizer.save_pretrained(out)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=hidden_size * 2, max_position_embeddings=512,
                        architectures=["BertModel"])
    config.save_pretrained(out)
    rng = np.random.RandomState(seed)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in BertModel(config, add_pooling_layer=False).state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        if "LayerNorm" in name:
            tensors[name] = np.full(shapes[name], 1.0 if name.endswith("weight") else 0.0, dtype=np.float32)
        else:  # sharper attention (query/key x4): each token's state depends on the text around it
            scale = 0.4 if ".attention.self.query." in name or ".attention.self.key." in name else 0.1
            tensors[name] = (rng.standard_normal(shapes[name]) * scale).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "1_Dense").mkdir(exist_ok=True)
    projection = (rng.standard_normal((embedding_size, hidden_size)) / hidden_size**0.5).astype(np.float32)
    save_file({"linear.weight": projection}, str(out / "1_Dense" / "model.safetensors"), metadata={"format": "pt"})
    (out / "1_Dense" / "config.json").write_text(json.dumps({
        "in_features": hidden_size, "out_features": embedding_size, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False}, indent=2))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}], indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 511, "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "model_type": "ColBERT", "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "MaxSim",
        "query_prefix": "[Q] ", "document_prefix": "[D] ", "query_length": query_length,
        "document_length": document_length, "attend_to_expansion_tokens": False,
        "skiplist_words": list(string.punctuation), "do_query_expansion": True}, indent=2))
    return out


def tensor_digest(folder: str | Path) -> str:
    """sha256 over every tensor of the folder's weight files (names, shapes, float32 bytes), in order: the
    same for the same weights, whatever wrote the files."""
    import hashlib

    from safetensors.numpy import load_file

    root, digest = Path(folder), hashlib.sha256()
    for path in sorted(root.rglob("*.safetensors")):
        for name, array in sorted(load_file(str(path)).items()):
            digest.update(f"{path.relative_to(root).as_posix()}:{name}:{array.shape}".encode())
            digest.update(array.astype("<f4").tobytes())
    return digest.hexdigest()
