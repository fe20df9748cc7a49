"""Compute efficiency: achieved FLOP/s of a transformer against the CPU's peak, both estimated openly.

Peak = cores x GHz x FLOPs/cycle/core, where FLOPs/cycle = FMA pipes x vector lanes x 2 (a fused
multiply-add is 2 FLOPs). Lanes come from the CPU flags in /proc/cpuinfo (never assumed): AVX-512F gives
16 fp32 lanes, AVX/AVX2 8, SSE 4; without FMA a lane does 1 FLOP per pipe. bf16 doubles lanes with
AVX512_BF16 (vdpbf16ps); AMX-BF16 adds 1024 FLOPs/cycle/core. The number of FMA pipes is not in the flags:
2 per core is right for every x86 core since Haswell / Zen 2 (Zen 1 did 256-bit work at half rate); pass
another with --fma-pipes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["cpu_peak", "model_flops_per_token"]


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key, value)
    return fields


def cpu_peak(fma_pipes: int = 2, cores: int | None = None) -> dict[str, Any]:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cores = cores or len(os.sched_getaffinity(0))
    mhz = float(info.get("cpu MHz", "0") or 0)
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags or "avx" in flags:
        lanes, isa = 8, "AVX2" if "avx2" in flags else "AVX"
    else:
        lanes, isa = 4, "SSE"
    per_lane = 2 if "fma" in flags else 1
    fp32_cycle = fma_pipes * lanes * per_lane
    bf16_cycle = fp32_cycle * 2 if "avx512_bf16" in flags else None
    if "amx_bf16" in flags:
        bf16_cycle = 1024
    ghz = mhz / 1000
    return {
        "model_name": info.get("model name", "unknown"),
        "cores": cores,
        "ghz": round(ghz, 3),
        "isa": isa,
        "fma": "fma" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "fma_pipes_assumed": fma_pipes,
        "fp32_flops_per_cycle_core": fp32_cycle,
        "peak_fp32_gflops": round(cores * ghz * fp32_cycle, 1),
        "peak_bf16_gflops": round(cores * ghz * bf16_cycle, 1) if bf16_cycle else None,
    }


def model_flops_per_token(model_dir: str, mean_len: float) -> dict[str, float]:
    """2 x (non-embedding matmul weights) + attention scores and mixing at mean sequence length.

    Attention: QK^T and AV are each 2 x heads x head_dim FLOPs per (query, key) pair per layer; a decoder
    (causal) query sees (L+1)/2 keys on average, an encoder query sees L.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    inter = cfg["intermediate_size"]
    gated = cfg.get("model_type") in ("qwen3", "qwen2", "llama", "mistral")
    attn_proj = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = hidden * inter * (3 if gated else 2)
    params = layers * (attn_proj + mlp)
    causal = cfg.get("model_type") in ("qwen3", "qwen2", "llama", "mistral")
    keys = (mean_len + 1) / 2 if causal else mean_len
    attention = layers * 2 * 2 * heads * head_dim * keys
    return {
        "matmul_params": params,
        "flops_per_token": 2 * params + attention,
        "attention_flops_per_token": attention,
    }
