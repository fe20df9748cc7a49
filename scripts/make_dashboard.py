"""Write the Grafana dashboard (deploy/helm/embedding-service/dashboards/embedding-service.json).

The panels are declared here, once, as (title, unit, queries); the JSON is generated so that its layout and ids
stay consistent. tests/test_dashboard.py checks that the committed JSON is this script's output and runs every
query against a real Prometheus scraping a real server. Run after changing a panel:

    python scripts/make_dashboard.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "embedding-service" / "dashboards" / \
    "embedding-service.json"

# `$model` is the dashboard's model variable (a regex of the chosen served names); `$__rate_interval` Grafana's
# rate window (at least four scrape intervals).
M = 'model=~"$model"'
R = "$__rate_interval"
TASKS = (("embedding", "texts"), ("embedding_rerank", "pairs"), ("embedding_sparse", "texts"))

# (title, unit, [(legend, expr)]), two panels to a row.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests per second by route", "reqps", [
        ("{{route}}", f"sum by (route) (rate(embedding_requests_total[{R}]))"),
    ]),
    ("Errors per second by kind", "reqps", [
        ("{{kind}}", f"sum by (kind) (rate(embedding_errors_total[{R}]))"),
    ]),
    ("Errors per second by HTTP status and route", "reqps", [
        ("{{status}} {{route}}",
         f'sum by (status, route) (rate(embedding_requests_total{{status=~"4..|5.."}}[{R}]))'),
    ]),
    ("Request latency by route (p50, p95, p99)", "s", [
        (f"p{q} {{{{route}}}}",
         f"histogram_quantile(0.{q}, sum by (le, route) (rate(embedding_request_duration_seconds_bucket[{R}])))")
        for q in (50, 95, 99)
    ]),
    ("Queue depth (requests queued or running)", "short", [
        (f"{{{{model}}}} {prefix.removeprefix('embedding').strip('_') or 'embed'}", f"{prefix}_queue_requests{{{M}}}")
        for prefix, _ in TASKS
    ] + [("{{model}} limit", f"embedding_queue_max_requests{{{M}}}")]),
    ("Mean batch size (sequences)", "short", [
        (f"{{{{model}}}} {prefix}",
         f"sum by (model) (rate({prefix}_batch_size_sum{{{M}}}[{R}])) / "
         f"sum by (model) (rate({prefix}_batch_size_count{{{M}}}[{R}]))")
        for prefix, _ in TASKS
    ]),
    ("Tokens per second by model", "short", [
        (f"{{{{model}}}} {prefix}", f"sum by (model) (rate({prefix}_tokens_total{{{M}}}[{R}]))")
        for prefix, _ in TASKS
    ]),
    ("Items per second by model (texts, rerank pairs)", "short", [
        (f"{{{{model}}}} {item}", f"sum by (model) (rate({prefix}_{item}_total{{{M}}}[{R}]))")
        for prefix, item in TASKS
    ]),
    ("Batch compute time p95", "s", [
        (f"{{{{model}}}} {prefix}",
         f"histogram_quantile(0.95, sum by (le, model) (rate({prefix}_batch_compute_seconds_bucket{{{M}}}[{R}])))")
        for prefix, _ in TASKS
    ]),
    ("Engine state (1 = current)", "short", [
        ("{{model}} {{state}}", f"embedding_engine_state{{{M}}} == 1"),
        ("{{model}} {{state}} (rerank)", f"embedding_rerank_engine_state{{{M}}} == 1"),
    ]),
    ("Batch API: lines per second by outcome", "short", [
        ("{{outcome}}", f"sum by (outcome) (rate(embedding_batch_lines_total[{R}]))"),
    ]),
    ("Batch API: batches", "short", [
        ("{{status}}", "sum by (status) (embedding_batch_unfinished)"),
        ("lines in flight", "sum(embedding_batch_lines_in_flight)"),
        ("{{model}} lines queued in the engine", f"embedding_queue_background_requests{{{M}}}"),
    ]),
    ("Result cache: hit ratio and evictions/s", "percentunit", [
        ("{{model}} hit ratio", f"sum by (model) (rate(embedding_result_cache_hits_total{{{M}}}[{R}])) / "
                                f"(sum by (model) (rate(embedding_result_cache_hits_total{{{M}}}[{R}])) + "
                                f"sum by (model) (rate(embedding_result_cache_misses_total{{{M}}}[{R}])))"),
        ("{{model}} evictions/s", f"sum by (model) (rate(embedding_result_cache_evictions_total{{{M}}}[{R}]))"),
    ]),
    ("Batch API: share of the engine", "percentunit", [
        ("{{model}}", f"sum by (model) (rate(embedding_engine_busy_seconds_total{{lane=\"batch\",{M}}}[{R}])) / "
                      f"sum by (model) (rate(embedding_engine_busy_seconds_total{{{M}}}[{R}]))"),
    ]),
]


def _panel(index: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict[str, object]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (legend, expr) in enumerate(queries)],
    }


def dashboard() -> dict[str, object]:
    return {
        "uid": "embedding-service",
        "title": "embedding-service",
        "description": "Traffic, latency, queue, batches, tokens and errors of embedding-service, per model "
                       "(generated by scripts/make_dashboard.py; metrics in docs/ops.md)",
        "tags": ["embedding-service"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
            {"name": "model", "label": "Model", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(model)", "refId": "models"},
             "definition": "label_values(model)", "refresh": 2, "includeAll": True, "multi": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": [_panel(i, *panel) for i, panel in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
