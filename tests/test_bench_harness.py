"""The benchmark harness's own logic: distinct deterministic texts, FLOP arithmetic, tables, a smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="bench/'s load generator needs aiohttp (the test extra)")

from bench.flops import cpu_peak, model_flops_per_token
from bench.loadgen import RunResult, percentile
from bench.report import markdown
from bench.workloads import QWEN3_QUERY_INSTRUCTION, WORKLOADS, TextMaker, as_sent, select_workloads

from .conftest import missing

ROOT = Path(__file__).resolve().parents[1]


def test_texts_are_distinct_within_and_across_workloads_and_repeatable() -> None:
    maker = TextMaker(seed=7)
    seen: set[str] = set()
    for work in WORKLOADS:
        texts = [t for request in maker.requests(work, 50) for t in request]
        assert len(set(texts)) == len(texts)
        assert not seen & set(texts), f"{work.name} repeats texts of another workload"
        seen |= set(texts)
    again = TextMaker(seed=7).requests(WORKLOADS[0], 50)
    assert again == maker.requests(WORKLOADS[0], 50)
    assert maker.requests(WORKLOADS[0], 50, salt=1) != again  # warm-up texts differ from measured ones


def test_calibration_scales_words_to_the_token_target() -> None:
    maker = TextMaker()
    maker.calibrate(lambda texts: [3 * len(t.split()) for t in texts])  # a tokenizer of 3 tokens per word
    short = maker.requests(select_workloads(["short-c1"])[0], 200)
    mean_tokens = sum(3 * len(r[0].split()) for r in short) / len(short)
    assert 12 <= mean_tokens <= 18


def test_request_shapes_follow_the_workload() -> None:
    maker = TextMaker()
    batch = maker.requests(select_workloads(["batch32"])[0], 3)
    assert [len(r) for r in batch] == [32, 32, 32]
    mixed = maker.requests(select_workloads(["mixed-c16"])[0], 200)
    assert {len(r) for r in mixed} <= set(range(1, 9)) and len({len(r) for r in mixed}) > 3
    with pytest.raises(SystemExit):
        select_workloads(["no-such-workload"])


def test_query_workload_sends_its_instruction_as_each_server_takes_it() -> None:
    """Our server gets the `instruction` field; any other server the query formatted as our server would."""
    from bench.loadgen import encode_body
    from embedding_service.engine.prompts import format_instruction

    work = select_workloads(["query-c16"])[0]
    requests = TextMaker().requests(work, 3)
    to_ours, field = as_sent(requests, work.instruction, server_formats=True)
    assert to_ours == requests and field == QWEN3_QUERY_INSTRUCTION
    assert json.loads(encode_body(to_ours[0], "m", "float", field))["instruction"] == QWEN3_QUERY_INSTRUCTION
    to_peers, field = as_sent(requests, work.instruction, server_formats=False)
    assert field is None and "instruction" not in json.loads(encode_body(to_peers[0], "m", "float", field))
    assert [r[0] for r in to_peers] == [format_instruction(QWEN3_QUERY_INSTRUCTION, r[0]) for r in requests]
    plain = select_workloads(["short-c16"])[0]
    assert as_sent(requests, plain.instruction, server_formats=False) == (requests, None)


def test_qwen3_flops_per_token_match_the_model_card(tmp_path: Path) -> None:
    config = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072}
    (tmp_path / "config.json").write_text(json.dumps(config))
    flops = model_flops_per_token(str(tmp_path), mean_len=1)
    assert flops["matmul_params"] == pytest.approx(0.44e9, rel=0.01)
    longer = model_flops_per_token(str(tmp_path), mean_len=501)
    # causal attention: each token sees (L+1)/2 keys; 2 matmuls x 2 FLOPs x 16 heads x 128 x 28 layers
    assert longer["attention_flops_per_token"] == pytest.approx(251 * 4 * 16 * 128 * 28)


def test_cpu_peak_is_derived_from_flags() -> None:
    peak = cpu_peak(fma_pipes=2, cores=1)
    lanes = {"AVX-512": 16, "AVX2": 8, "AVX": 8, "SSE": 4}[peak["isa"]]
    assert peak["fp32_flops_per_cycle_core"] == 2 * lanes * (2 if peak["fma"] else 1)


def test_percentiles_and_summary() -> None:
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    result = RunResult(requests=4, texts=8, tokens=80, wall_s=2.0, latencies_ms=[1.0, 2.0, 3.0, 4.0],
                       server_cpu_s=0.4)
    summary = result.summary()
    assert summary["texts_per_s"] == 4.0 and summary["tokens_per_s"] == 40.0
    assert summary["server_cpu_ms_per_req"] == 100.0


def test_markdown_has_ratios_against_the_ceiling_and_peers() -> None:
    machine = cpu_peak()
    rows = [{"model": "m", "target": t, "workload": "short-c16", "requests": 1, "texts_per_s": v}
            for t, v in [("inproc-engine-torch", 100.0), ("ours-torch", 90.0), ("vllm-serve", 60.0)]]
    text = markdown({"started": "now", "machine": machine, "command": "python -m bench", "duration_s": 1,
                     "threads": 2, "dtype": "float32", "models": [{"name": "m", "dir": "/m"}], "rows": rows,
                     "skipped": ["m: infinity: not installed"]})
    assert "| short-c16 | 100.0 | 90.0 | 60.0 | 0.90x | 1.50x |" in text
    assert "infinity: not installed" in text


def test_markdown_sets_the_bare_floor_against_the_ceiling_and_ours_against_the_floor() -> None:
    rows = [{"model": "m", "target": t, "workload": "short-c64", "requests": 1, "texts_per_s": v}
            for t, v in [("inproc-engine-vllm", 500.0), ("ours-vllm", 400.0), ("bare-vllm", 450.0)]]
    text = markdown({"started": "now", "machine": cpu_peak(), "command": "python -m bench", "duration_s": 1,
                     "threads": 2, "dtype": "float32", "models": [{"name": "m", "dir": "/m"}], "rows": rows})
    assert "| ours-vllm / in-proc | bare-vllm / in-proc | ours-vllm / bare-vllm |" in text
    assert "| short-c64 | 500.0 | 400.0 | 450.0 | 0.80x | 0.90x | 0.89x |" in text


def test_thread_deltas_keep_threads_that_worked_or_were_preempted() -> None:
    from bench.thread_cpu import threads_delta

    before = {1: ("loop", 10, 5, 1.0), 2: ("omp", 3, 3, 2.0), 3: ("idle", 1, 1, 0.0)}
    after = {1: ("loop", 20, 9, 1.5), 2: ("omp", 5, 40, 3.0), 3: ("idle", 2, 2, 0.0), 4: ("new", 0, 0, 9.0)}
    assert threads_delta(before, after) == [(2, "omp", 2, 37, 1.0), (1, "loop", 10, 4, 0.5)]


def test_repeated_rounds_report_medians_and_the_range_of_per_round_ratios() -> None:
    """--repeat: a drifting machine moves both targets of a round alike; ratios pair rounds, not medians."""
    machine = cpu_peak()
    rates = {1: (100.0, 90.0), 2: (200.0, 170.0), 3: (150.0, 120.0)}  # (in-process, ours) per round
    rows = [{"model": "m", "target": target, "workload": "short-c16", "requests": 1, "texts_per_s": rate,
             "round": rnd} for rnd, pair in rates.items()
            for target, rate in zip(("inproc-engine-torch", "ours-torch"), pair, strict=True)]
    text = markdown({"started": "now", "machine": machine, "command": "python -m bench --repeat 3",
                     "duration_s": 1, "threads": 2, "dtype": "float32", "models": [{"name": "m", "dir": "/m"}],
                     "rows": rows})
    # medians 150 and 120 (whose ratio, 0.80, is no round's); per-round ratios 0.90, 0.85, 0.80
    assert "| short-c16 | 150.0 | 120.0 | 0.85x (0.80-0.90) |" in text
    assert "median of 3 rounds" in text


@pytest.mark.slow
def test_overhead_mode_runs_end_to_end(tmp_path: Path) -> None:
    """Starts our server and the two floors (bench/bare_server.py on the fake engine, bench/bare_asgi.py), drives
    each briefly, writes both reports."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--overhead", "--targets", "ours-fake,bare-fake,bare-asgi",
                           "--workloads", "short-c1,short-c16", "--duration", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["skipped"] == []
    rows = {(r["target"], r["workload"]): r for r in result["rows"]}
    assert set(rows) == {(t, w) for t in ("ours-fake", "bare-fake", "bare-asgi") for w in ("short-c1", "short-c16")}
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in rows.values())
    assert all(r["tokens"] > 0 for (target, _w), r in rows.items() if target != "bare-asgi")  # (it counts none)
    assert "| ours-fake / bare-fake | ours-fake / bare-asgi |" in (tmp_path / "results.md").read_text()


def test_chart_has_one_bar_per_target_and_ratio_labels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.chart import write_chart

    rows = [{"model": "minilm", "workload": w, "target": t, "texts_per_s": v}
            for w, t, v in [("short-c16", "ours-vllm", 150.0), ("short-c16", "vllm-serve", 100.0),
                            ("batch32", "ours-vllm", 90.0), ("batch32", "vllm-serve", 60.0)]]
    out = write_chart({"rows": rows, "dtype": "float32", "threads": 2}, tmp_path / "chart.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_chart({"rows": []}, tmp_path / "none.png") is None


@pytest.mark.slow
def test_wrk_client_counts_what_the_server_answered(server_factory) -> None:
    """bench --client wrk: it stops once every body is answered; texts and tokens come from the responses,
    refused requests count as errors, and wrk's own CPU time is measured."""
    from bench.loadgen import run_async
    from bench.wrk_client import drive_wrk, wrk_available

    if not wrk_available():
        missing("wrk is missing (.ci/run installs it)", "wrk is not installed (apt-get install wrk)")

    server = server_factory(["--engine", "fake", "--served-model-name", "m", "--max-batch-size", "8"])
    server.wait_healthy()
    url = server.url + "/v1/embeddings"
    good = [["two", f"texts {i}"] for i in range(30)]
    res = run_async(drive_wrk(url, good, concurrency=4, duration_s=30, model="m"))
    assert (res.requests, res.errors, res.texts) == (30, 0, 60)
    assert res.tokens > 60 and res.wall_s < 20  # stopped once all were answered, not after 30 s
    assert res.client_cpu_s > 0 and res.percentiles_ms is not None and res.summary()["p50_ms"] > 0
    bad = run_async(drive_wrk(url, [["fine"], [""] * 0, ["fine too"]], concurrency=1, duration_s=30, model="m"))
    assert (bad.requests, bad.errors, bad.texts) == (2, 1, 2)
    assert bad.error_samples and "non-200" in bad.error_samples[0]


def test_layer_cost_runs_every_layer_of_the_request_path() -> None:
    """bench.studies.layer_cost finds the direct lane in the app `serve` builds and drives each variant to the end."""
    out = subprocess.run([sys.executable, "-m", "bench.studies.layer_cost", "--requests", "128", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    micros = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if "per request" in line}
    assert set(micros) == {"engine", "uvicorn", "route", "lifecycle", "context", "app"}, out
    assert all(value > 0 for value in micros.values()), micros  # (one short round: too noisy to compare)
