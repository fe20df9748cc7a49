"""SmoothQuant before int8 on decoders: move activation outlier channels into the weights, exactly in fp32.

Why: trained LLMs (Qwen3 included) have a few hidden channels 20-100x the others at the input of every linear
layer (LLM.int8(), SmoothQuant). int8 then loses the other channels: the activations' scale (per group of 32
in OpenVINO's dynamic quantisation) is set by the outlier, and the outlier multiplies the int8 weights' error.
SmoothQuant divides each input channel's producer (a norm's weight, or up_proj's output row before
down_proj) by s_j = max|X_j|^a / max|W_j|^(1-a) and multiplies that input column of the linear layers after it
by s_j: the same function in fp32, with the outliers shared between activations and weights. Measured on a
test model with such channels (bench/studies/int8_outliers.py, bench/RESULTS.md): min cos to fp32 0.959 without,
>= 0.99 with.

The activation maxima come from a forward pass over seeded random token ids (no text of yours, no data
file): outlier channels are properties of the weights, seen on any tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ALPHA", "calibration_batches", "smooth_decoder"]

# SmoothQuant's balance point (the paper's default for most models): half of each outlier to the weights.
ALPHA = 0.5


def calibration_batches(vocab_size: int, suffix: list[int], *, batches: int = 16, rows: int = 8,
                        seed: int = 0) -> list[np.ndarray]:
    """Seeded random token ids, `batches` arrays of `rows` x 8-64 tokens, each row closed by `suffix` (the
    tokens a real text ends with, where last-token pooling reads)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        length = int(rng.integers(8, 65))
        ids = rng.integers(0, vocab_size, size=(rows, length), dtype=np.int64)
        out.append(np.concatenate([ids, np.tile(np.asarray(suffix, dtype=np.int64), (rows, 1))], axis=1))
    return out


def _smoothable(layer: Any) -> list[tuple[Any, list[Any]]]:
    """(producer, linear layers fed by it) of a Llama-style decoder layer (Llama, Mistral, Qwen2/3), [] for
    others: each norm before the layers it feeds, and up_proj before down_proj (down_proj's input is
    act(gate) * up, linear in up's output rows)."""
    try:
        attn, mlp = layer.self_attn, layer.mlp
        return [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]), (mlp.up_proj, [mlp.down_proj])]
    except AttributeError:
        return []


def smooth_decoder(model: Any, batches: list[np.ndarray], alpha: float = ALPHA) -> int:
    """Smooth `model` (a transformers base model) in place; the number of layer inputs smoothed (0: not a
    Llama-style decoder, such as BERT, left as it was)."""
    import torch

    groups = [group for layer in getattr(model, "layers", []) for group in _smoothable(layer)]
    if not groups:
        return 0
    maxima: dict[int, torch.Tensor] = {}

    def record(index: int) -> Any:
        def hook(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            seen = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)
            maxima[index] = torch.maximum(maxima[index], seen) if index in maxima else seen
        return hook

    def forward(ids: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            tensor = torch.from_numpy(ids)
            return model(input_ids=tensor, attention_mask=torch.ones_like(tensor), use_cache=False).last_hidden_state

    handles = [fcs[0].register_forward_pre_hook(record(i)) for i, (_norm, fcs) in enumerate(groups)]
    try:
        reference = forward(batches[0])  # every batch feeds the maxima; the first also checks the result
        for ids in batches[1:]:
            forward(ids)
    finally:
        for handle in handles:
            handle.remove()
    params = [p for norm, fcs in groups for p in (norm.weight, *(fc.weight for fc in fcs))]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for index, (norm, fcs) in enumerate(groups):
            weight_max = torch.cat([fc.weight.abs() for fc in fcs], dim=0).amax(dim=0).clamp(min=1e-5)
            scale = (maxima[index].clamp(min=1e-5).pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)
            norm.weight.div_(scale if norm.weight.dim() == 1 else scale[:, None])  # a norm, or up_proj's rows
            for fc in fcs:
                fc.weight.mul_(scale)
    # Exact only where the norm is weight * normalised(x) (not Gemma's (1 + weight) * ...): check, else undo.
    if not torch.allclose(forward(batches[0]), reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max())):
        with torch.no_grad():
            for param, before in zip(params, saved, strict=True):
                param.copy_(before)
        return 0
    return len(groups)
