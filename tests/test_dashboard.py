"""The Grafana dashboard and the alert rules, checked by Debian's real `prometheus` scraping a real server.

One server serves an embedding model, a reranker and a sparse model (a models file) with the Batch API on; a
Prometheus started here scrapes it every second while the test sends traffic (embeddings, rerank, sparse, a
batch, requests refused with 400, 404, 415 and 503). Then every panel query of the dashboard and every alert rule runs
through Prometheus' HTTP API. A query naming a metric or label the service does not export is the usual way a
dashboard breaks: here it comes back empty and fails the test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import ROOT, ServerProcess, free_port, missing, serving

DASHBOARD = ROOT / "deploy" / "helm" / "embedding-service" / "dashboards" / "embedding-service.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RATE_WINDOW = "20s"  # stands for Grafana's $__rate_interval: several 1 s scrapes, all inside the traffic


def _targets() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel["targets"]]


def test_dashboard_is_the_generators_output() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == make_dashboard.render(), "run python scripts/make_dashboard.py"
    titles = [title for title, _ in _targets()]
    for wanted in ("Requests", "Errors", "latency", "Queue", "batch size", "Tokens", "Batch API"):
        assert any(wanted in title for title in titles), wanted


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, random_splade_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("dashboard")
    models = root / "models.yaml"
    models.write_text(f"""models:
  - name: embedder
    model_name: acme/embedder
    engine: fake
    max_queue_requests: 4
  - name: judge
    model_name: acme/judge
    engine: fake
    task: rerank
  - name: splade
    model_path: {random_splade_dir}
    task: sparse
    engine: torch
    dtype: float32
""")
    yield from serving(["--models-file", str(models), "--fake-delay-ms", "20", "--data-dir", str(root / "data")])


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        missing("prometheus is not installed (.ci/run installs Debian's prometheus)",
                "prometheus is not installed (apt-get install prometheus)")
    root = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "embedding-service",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _up(url):
            assert proc.poll() is None and time.monotonic() < deadline, (root / "prometheus.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _up(url: str) -> bool:
    try:
        answer = httpx.get(url + "/api/v1/query", params={"query": 'up{job="embedding-service"} == 1'}, timeout=5)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and bool(answer.json()["data"]["result"])


def _traffic(base: str, seconds: float) -> None:
    """Embeddings (some refused 503 by the small queue, some 400), rerank, sparse and one batch."""
    body = b'{"custom_id": "%d", "method": "POST", "url": "/v1/embeddings", "body": {"input": "line %d"}}\n'
    with httpx.Client(base_url=base, timeout=30) as client:
        uploaded = client.post("/v1/files", files={"file": ("in.jsonl", b"".join(body % (i, i) for i in range(40)))},
                               data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        batch = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                 "endpoint": "/v1/embeddings", "completion_window": "24h"})
        assert batch.status_code == 200, batch.text

    def one(i: int) -> int:
        with httpx.Client(base_url=base, timeout=30) as client:
            kind = i % 5
            if kind == 0:
                return client.post("/v1/rerank", json={"model": "judge", "query": "q", "documents": ["a", "b"]}
                                   ).status_code
            if kind == 1:
                return client.post("/embed_sparse", json={"inputs": f"sparse text {i}", "model": "splade"}
                                   ).status_code
            if kind == 2:  # refused: 400, 404, 415 (each its own error kind)
                refused = i // 5 % 3
                if refused == 1:
                    return client.get(f"/no/such/page/{i}").status_code
                if refused == 2:
                    return client.post("/v1/embeddings", content=b"x", headers={"Content-Type": "text/plain"}
                                       ).status_code
                return client.post("/v1/embeddings", json={"input": ""}).status_code
            return client.post("/v1/embeddings", json={"model": "embedder", "input": [f"text {i}"] * 4}).status_code

    statuses: set[int] = set()
    deadline = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        while time.monotonic() < deadline:
            statuses.update(pool.map(one, range(64)))

    async def burst() -> list[int]:  # 32 at once into a queue of 4: some are refused (503, overloaded)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=32)) as client:
            answers = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": "embedder", "input": "burst"})
                                             for _ in range(32)))
        return [answer.status_code for answer in answers]

    statuses.update(asyncio.run(burst()))
    assert {200, 400, 404, 415, 503} <= statuses, statuses  # each kind the error panels count happened


def _query(prometheus: str, expr: str, at: float) -> list[dict[str, Any]]:
    answer = httpx.get(prometheus + "/api/v1/query", params={"query": expr, "time": at}, timeout=30)
    assert answer.status_code == 200, f"{expr}: {answer.text}"
    result: list[dict[str, Any]] = answer.json()["data"]["result"]
    return result


def _with_bool(expr: str) -> str:
    """An alert's expression with its final comparison made a `bool` one, so that it returns its series (0 or 1)
    whether or not the alert fires: what is checked is that it reads real data."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*([0-9.]+)\s*$", r"\1 bool \2", expr.strip())


@pytest.mark.slow
def test_every_panel_and_alert_reads_real_series(server: ServerProcess, prometheus: str) -> None:
    _traffic(server.url, 12.0)
    time.sleep(2.5)  # the last scrapes of the traffic
    at = time.time()
    empty = []
    for title, expr in _targets():
        concrete = expr.replace("$__rate_interval", RATE_WINDOW).replace("$model", ".*")
        result = _query(prometheus, concrete, at)
        # a series of a route or model without traffic in the window is NaN (a rate over nothing): some must not be
        if not any(float(series["value"][1]) == float(series["value"][1]) for series in result):
            empty.append(f"{title}: {concrete}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)
    (kinds_expr,) = [expr for title, expr in _targets() if title == "Errors per second by kind"]
    kinds = {series["metric"]["kind"] for series in _query(prometheus, kinds_expr.replace("$__rate_interval",
                                                                                          RATE_WINDOW), at)}
    # the traffic's refusals, each under its own kind (the two 503s' causes would differ too)
    assert {"invalid_request", "not_found", "unsupported_media_type", "overloaded"} <= kinds, kinds
    models = {series["metric"]["model"] for series in _query(prometheus, "embedding_model_info", at)}
    models |= {series["metric"]["model"] for series in _query(prometheus, "embedding_rerank_model_info", at)}
    models |= {series["metric"]["model"] for series in _query(prometheus, "embedding_sparse_model_info", at)}
    assert models == {"embedder", "judge", "splade"}  # what the dashboard's model variable lists

    rules = yaml.safe_load(ALERTS.read_text())
    for rule in (rule for group in rules["groups"] for rule in group["rules"]):
        expr = _with_bool(rule["expr"].replace("[5m]", f"[{RATE_WINDOW}]"))
        assert _query(prometheus, expr, at), f"alert {rule['alert']} reads no series: {expr}"
    loaded = httpx.get(prometheus + "/api/v1/rules", timeout=30).json()["data"]["groups"]
    evaluated = [rule for group in loaded for rule in group["rules"]]
    assert len(evaluated) == sum(len(group["rules"]) for group in rules["groups"])
    assert all(rule["health"] == "ok" for rule in evaluated), [r for r in evaluated if r["health"] != "ok"]
