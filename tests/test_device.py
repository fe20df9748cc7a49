"""CPU dtype choice: float16 runs as bf16 where the CPU has it natively, else fp32."""

from __future__ import annotations

import pytest


def test_float16_on_cpu_runs_as_bf16_or_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedding_service.backends.runtime import device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert device.resolve_cpu_dtype("float16") == "bfloat16"
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    assert device.resolve_cpu_dtype("float16") == "float32"
    assert device.resolve_cpu_dtype("float32") == "float32"


# /proc/cpuinfo flags of the CPU kinds the int8 choice meets (abridged to what matters, plus neighbours).
ZEN2_AVX2 = "fpu sse4_2 avx f16c fma avx2 bmi2 sha_ni"
SKYLAKE_X = "avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"  # AVX-512 without VNNI
ZEN4_EPYC = "avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
ALDER_LAKE = "avx2 fma avx_vnni"  # AVX-VNNI on 256-bit registers, no AVX-512
SAPPHIRE_RAPIDS = "avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
GRAVITON = "fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp"


@pytest.mark.parametrize(("flags", "isa"), [
    (ZEN2_AVX2, None), (SKYLAKE_X, None), (ZEN4_EPYC, "AVX-512 VNNI"), (ALDER_LAKE, "AVX-VNNI"),
    (SAPPHIRE_RAPIDS, "AMX"), (GRAVITON, None), ("", None)])
def test_int8_dot_product_isa_is_read_from_the_flags(flags: str, isa: str | None) -> None:
    from embedding_service.backends.runtime.device import int8_dot_product_isa

    assert int8_dot_product_isa(frozenset(flags.split())) == isa


@pytest.mark.parametrize(("flags", "slow"), [
    (ZEN2_AVX2, True), (SKYLAKE_X, True), (ZEN4_EPYC, False), (ALDER_LAKE, False), (SAPPHIRE_RAPIDS, False),
    (GRAVITON, False),  # not x86: OpenVINO's Arm kernels have their own int8 path; nothing measured to say
    ("", False)])  # no /proc/cpuinfo: unknown, so no claim
def test_int8_is_called_slow_only_on_x86_without_int8_dot_products(flags: str, slow: bool) -> None:
    from embedding_service.backends.runtime.device import int8_slow_reason

    reason = int8_slow_reason(frozenset(flags.split()))
    assert (reason is not None) == slow
    if reason is not None:
        assert "VNNI" in reason and "fp32 arithmetic" in reason
