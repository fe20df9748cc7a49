"""Tables: a texts/s matrix per model (workloads x targets, with the ratios the targets are judged by) and a
detail table (tokens/s, latency percentiles, errors, client and server CPU, FLOP efficiency)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["markdown"]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}x"


def _matrix(rows: Sequence[dict[str, Any]], workloads: list[str], targets: list[str]) -> list[str]:
    rate = {(r["target"], r["workload"]): r["texts_per_s"] for r in rows if r.get("requests")}
    ours = [t for t in targets if t.startswith("ours-") and t != "ours-fake"]
    peers = [t for t in ("vllm-offline", "vllm-serve", "infinity") if t in targets]
    ratio_cols: list[tuple[str, str, str]] = []
    for name in ours:
        engine = name.removeprefix("ours-")
        if f"inproc-engine-{engine}" in targets:
            ratio_cols.append((f"{name} / in-proc", name, f"inproc-engine-{engine}"))
    for peer in peers:
        for name in ours:
            ratio_cols.append((f"{name} / {peer}", name, peer))
    if "ours-vllm" in targets and "ours-torch" in targets:
        ratio_cols.append(("ours-vllm / ours-torch", "ours-vllm", "ours-torch"))
    head = ["workload", *targets, *(c[0] for c in ratio_cols)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in workloads:
        cells = [w, *(_fmt(rate.get((t, w))) for t in targets)]
        cells += [_ratio(rate.get((a, w)), rate.get((b, w))) for _, a, b in ratio_cols]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _details(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "target",
        "workload",
        "texts/s",
        "tokens/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "client CPU s (%)",
        "server CPU s",
        "server CPU ms/req",
        "GFLOP/s (% peak)",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flops = "–"
        if r.get("gflops") is not None:
            flops = f"{r['gflops']:.1f} ({r['pct_peak']:.0f}%)"
        out.append(
            "| "
            + " | ".join(
                [
                    r["target"],
                    r["workload"],
                    _fmt(r.get("texts_per_s")),
                    _fmt(r.get("tokens_per_s"), 0),
                    _fmt(r.get("p50_ms")),
                    _fmt(r.get("p95_ms")),
                    _fmt(r.get("p99_ms")),
                    str(r.get("errors", "–")),
                    f"{_fmt(r.get('client_cpu_s'), 2)} ({_fmt(r.get('client_cpu_pct'), 0)}%)",
                    _fmt(r.get("server_cpu_s"), 2),
                    _fmt(r.get("server_cpu_ms_per_req"), 3),
                    flops,
                ]
            )
            + " |"
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Benchmark run {result['started']}", ""]
    machine = result["machine"]
    lines += [
        f"- CPU: {machine['model_name']}, {machine['cores']} cores @ {machine['ghz']} GHz, {machine['isa']}"
        f"{' + FMA' if machine['fma'] else ''}; AVX512-BF16: {machine['avx512_bf16']}, "
        f"AMX-BF16: {machine['amx_bf16']}",
        f"- Estimated peak: {machine['peak_fp32_gflops']} GFLOP/s fp32"
        f" ({machine['fp32_flops_per_cycle_core']} FLOP/cycle/core, {machine['fma_pipes_assumed']} FMA "
        f"pipes assumed); bf16: {machine['peak_bf16_gflops'] or 'no native bf16'}",
        f"- Command: `{result['command']}`",
        f"- Duration per workload: {result['duration_s']} s; threads: {result['threads']}; dtype: {result['dtype']}",
        "",
    ]
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model["name"]]
        if not rows:
            continue
        targets = list(dict.fromkeys(r["target"] for r in rows))
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        lines += [f"## {model['name']} ({model['dir']})", ""]
        if model.get("note"):
            lines += [model["note"], ""]
        lines += ["Texts/s (higher is better):", "", *_matrix(rows, workloads, targets), ""]
        lines += ["Details:", "", *_details(rows), ""]
    if result.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    return "\n".join(lines)
