"""One batch input file three ways, in alternating rounds (issue 40, item 6): the server's Batch API, `embed
--batch-file --url` through the same server, and `embed --batch-file` with the model in process.

    embedding-service serve --demo --engine torch --dtype float32 --host 127.0.0.1 --port 8897 \\
        --data-dir /tmp/bf-data --result-cache-bytes 0 &
    python -m bench.studies.batch_file --url http://127.0.0.1:8897 [--lines 2000] [--texts 1] [--rounds 3] \\
        [--embed-args "--demo --engine torch --dtype float32"]

Lines/s: the Batch API's from `in_progress_at` to `completed_at` (whole seconds: use batches of 10 s or more),
the `embed` runs' from their summary line (running the lines: after validation and the model load). The server
is idle but for the run measured (its result cache off; every text is new anyway); the in-process run shares
the cores with the idle server.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .batch_probe import _batch_file

_RATE = re.compile(r"running them: ([0-9.]+) requests/s")


def _api(http: httpx.Client, content: bytes) -> float:
    uploaded = http.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    uploaded.raise_for_status()
    batch = http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings",
                                           "completion_window": "24h"}).json()
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    assert batch["status"] == "completed", batch
    seconds = max(batch["completed_at"] - batch["in_progress_at"], 1)
    return batch["request_counts"]["total"] / seconds


def _embed(source: Path, output: Path, extra: list[str]) -> float:
    done = subprocess.run([sys.executable, "-m", "embedding_service", "embed", "--batch-file", str(source), "-o",
                           str(output), "--overwrite", "--log-level", "WARNING", *extra],
                          capture_output=True, text=True, timeout=3600, check=False)
    found = _RATE.search(done.stderr)
    if done.returncode or not found:
        raise RuntimeError(done.stderr[-2000:])
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="the server's root URL (started with --data-dir)")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--texts", type=int, default=1, help="texts per line")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--embed-args", default="--demo --engine torch --dtype float32")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=args.url, timeout=60) as http:
        folder = Path(tmp)
        base = int(time.time()) % 100_000 * 1_000_000_000  # texts no earlier run sent (a server's cache is off anyway)
        for round_ in range(args.rounds):
            sources = []
            for way in range(3):  # fresh texts for each run: no result cache helps
                sources.append(folder / f"in{round_}-{way}.jsonl")
                sources[-1].write_bytes(_batch_file(args.lines, args.texts, base + (3 * round_ + way) * 10_000_000))
            row = {"round": round_ + 1, "batch_api": _api(http, sources[0].read_bytes()),
                   "embed_url": _embed(sources[1], folder / "url.jsonl", ["--url", args.url + "/v1"]),
                   "embed_in_process": _embed(sources[2], folder / "local.jsonl", shlex.split(args.embed_args))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    ratios = {key: statistics.median(r[key] / r["batch_api"] for r in rows) for key in ("embed_url",
                                                                                        "embed_in_process")}
    print(json.dumps({"lines": args.lines, "texts_per_line": args.texts, "rounds": rows,
                      "median_ratio_to_batch_api": ratios}, indent=1))


if __name__ == "__main__":
    main()
