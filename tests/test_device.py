"""CPU dtype choice: float16 runs as bf16 where the CPU has it natively, else fp32."""

from __future__ import annotations

import pytest


def test_float16_on_cpu_runs_as_bf16_or_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedding_service.backends import device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert device.resolve_cpu_dtype("float16") == "bfloat16"
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    assert device.resolve_cpu_dtype("float16") == "float32"
    assert device.resolve_cpu_dtype("float32") == "float32"
