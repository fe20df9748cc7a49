"""Tables: a texts/s matrix per model (workloads x targets, with the ratios the targets are judged by) and a
detail table (tokens/s, latency percentiles, errors, client and server CPU, FLOP efficiency)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["markdown", "median_rates"]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _per_round(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """texts/s by (target, workload), then by round (--repeat; 1 when a run has one round)."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r.get("requests"):
            out.setdefault((r["target"], r["workload"]), {})[int(r.get("round", 1))] = float(r["texts_per_s"])
    return out


def median_rates(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """texts/s by (target, workload): the median over rounds."""
    return {key: statistics.median(by_round.values()) for key, by_round in _per_round(rows).items()}


def _ratio(a: dict[int, float] | None, b: dict[int, float] | None) -> str:
    """The ratio of two targets round by round: the median, with the range when there are several rounds."""
    ratios = sorted(a[k] / b[k] for k in a.keys() & b.keys() if b[k]) if a and b else []
    if not ratios:
        return "–"
    text = f"{statistics.median(ratios):.2f}x"
    return text + (f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else "")


def _matrix(rows: Sequence[dict[str, Any]], workloads: list[str], targets: list[str]) -> list[str]:
    rate, by_round = median_rates(rows), _per_round(rows)
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
    for name in (t for t in targets if t.startswith("bare-")):  # the request path's floor (bench/bare_server.py)
        engine = name.removeprefix("bare-")
        if f"inproc-engine-{engine}" in targets:
            ratio_cols.append((f"{name} / in-proc", name, f"inproc-engine-{engine}"))
        if f"ours-{engine}" in targets:
            ratio_cols.append((f"ours-{engine} / {name}", f"ours-{engine}", name))
    if "bare-asgi" in targets and "ours-fake" in targets:  # the ASGI floor (bench/bare_asgi.py)
        ratio_cols.append(("ours-fake / bare-asgi", "ours-fake", "bare-asgi"))
    head = ["workload", *targets, *(c[0] for c in ratio_cols)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in workloads:
        cells = [w, *(_fmt(rate.get((t, w))) for t in targets)]
        cells += [_ratio(by_round.get((a, w)), by_round.get((b, w))) for _, a, b in ratio_cols]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _details(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "target",
        "workload",
        "round",
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
                    str(r.get("round", 1)),
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
        rounds = len({r.get("round", 1) for r in rows})
        what = f"median of {rounds} rounds; ratios: median (range) of the per-round ratios" if rounds > 1 else ""
        lines += [f"Texts/s (higher is better{'; ' + what if what else ''}):", "",
                  *_matrix(rows, workloads, targets), ""]
        lines += ["Details:", "", *_details(rows), ""]
    if result.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    return "\n".join(lines)
