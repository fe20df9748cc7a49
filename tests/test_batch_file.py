"""`embed --batch-file`: a Batch API input file run by the bulk runner. In process (fake engine): the output and
error files equal the server Batch API's for the same file, and a bad file is refused line by line with nothing
run. Slow: killed mid-run and rerun gives the same bytes; two `--url` servers and `--ray local` give the same
bytes as in process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from embedding_service.api.app import create_app
from embedding_service.api.served import Served
from embedding_service.bulk.batch_file import BatchFileInvalid, BatchFileJob, run_batch_file
from embedding_service.bulk.batch_senders import InProcessApp
from embedding_service.bulk.manifest import work_dir
from embedding_service.cli import main
from embedding_service.config import EmbeddingConfig
from embedding_service.service import build_engines, plan_service

from .conftest import ServerProcess, has_module, in_process_client, make_settings

FAKE = {"engine": "fake", "served_model_name": "fake-model"}
BODIES: dict[str, dict[str, Any]] = {
    "one": {"input": "hello world", "model": "fake-model"},
    "many": {"input": ["a", "b c", "d e f"], "encoding_format": "base64"},
    "dims": {"input": "x", "dimensions": 8},  # the fake model is not Matryoshka: the endpoint's own 400
    "empty": {"input": ""},  # the endpoint's 400 too
    **{f"t{i}": {"input": [f"text {i} {'word ' * (i % 7)}", f"second {i}"]} for i in range(40)},
}


def _line(custom_id: str, body: Any, url: str = "/v1/embeddings", method: str = "POST") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body}) + b"\n"


def _requests(path: Path, bodies: dict[str, dict[str, Any]] = BODIES) -> Path:
    path.write_bytes(b"".join(_line(cid, body) for cid, body in bodies.items()))
    return path


def _without_ids(content: bytes) -> list[dict[str, Any]]:
    """Output lines with the batch's own ids left out (a batch id is the server's; ours the file's digest)."""
    lines = [orjson.loads(raw) for raw in content.splitlines()]
    for line in lines:
        del line["id"]
        del line["response"]["request_id"]
    return lines


@asynccontextmanager
async def batch_api(settings: EmbeddingConfig) -> AsyncIterator[httpx.AsyncClient]:
    """A server app with the Batch API, over the engine `settings` plan (as `embed` in process builds it)."""
    plan = plan_service(settings)
    engines = build_engines(plan)
    app = create_app(settings, models=[Served(name, engines[name], m.role, m.aliases)
                                       for name, m in plan.models.items()])
    api = app.state.batch_api
    for engine in engines.values():
        await engine.start()
    try:
        async with in_process_client(app) as http:
            assert (await http.get("/health")).status_code == 200  # builds the middleware stack the lines enter
            api.runner.start()
            yield http
    finally:
        await api.runner.stop()
        api.store.close()
        api.disk.close()
        for engine in engines.values():
            await engine.stop()


async def _server_batch(http: httpx.AsyncClient, content: bytes) -> tuple[bytes, bytes]:
    uploaded = await http.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    made = await http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings",
                                                "completion_window": "24h"})
    batch = made.json()
    for _ in range(1000):
        batch = (await http.get(f"/v1/batches/{batch['id']}")).json()
        if batch["status"] in ("completed", "failed"):
            break
        await asyncio.sleep(0.02)
    assert batch["status"] == "completed", batch
    output = await http.get(f"/v1/files/{batch['output_file_id']}/content")
    errors = await http.get(f"/v1/files/{batch['error_file_id']}/content")
    return output.content, errors.content


async def test_output_and_error_files_equal_the_server_batch_apis(tmp_path: Path) -> None:
    source = _requests(tmp_path / "requests.jsonl")
    job = BatchFileJob(source, tmp_path / "out.jsonl", chunk_lines=8)  # (several chunks, two in flight)
    summary = await run_batch_file(job, InProcessApp(make_settings(**FAKE), concurrency=4))
    assert (summary.total, summary.counts) == (len(BODIES), (len(BODIES) - 2, 2))
    assert summary.errors == tmp_path / "out.errors.jsonl" and not work_dir(job.output).exists()
    async with batch_api(make_settings(**FAKE, data_dir=str(tmp_path / "data"))) as http:
        output, errors = await _server_batch(http, source.read_bytes())
        online = (await http.post("/v1/embeddings", json=BODIES["many"])).json()
    ours = _without_ids(job.output.read_bytes())
    assert ours == _without_ids(output)  # every body (vectors included) and status as the server's Batch API
    assert _without_ids(job.errors_path.read_bytes()) == _without_ids(errors)
    assert [line["custom_id"] for line in ours] == [cid for cid in BODIES if cid not in ("dims", "empty")]
    assert ours[1]["response"]["body"] == online  # and so as the online endpoint
    again = await run_batch_file(job, InProcessApp(make_settings(**FAKE), concurrency=4))
    assert again.already_done  # a rerun of a finished job does nothing


def test_a_bad_file_is_refused_naming_each_line_and_nothing_runs(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(_line("a", {"input": "fine"}) + b"{not json\n" + _line("b", {"input": "x"}, url="/v1/rerank")
                       + _line("a", {"input": "again"}) + _line("c", {"input": "y"}, method="GET"))
    output = tmp_path / "out.jsonl"
    assert main(["embed", "--batch-file", str(source), "-o", str(output), "--engine", "fake"]) == 1
    err = capsys.readouterr().err
    for number, code in ((2, "invalid_json_line"), (3, "invalid_url"), (4, "duplicate_custom_id"),
                         (5, "invalid_method")):
        assert f"line {number}" in err and f"[{code}]" in err, err
    assert not output.exists() and not work_dir(output).exists()


async def test_validation_runs_before_anything_is_sent(tmp_path: Path) -> None:
    class Refuses:  # a sender that must not be used
        depth = 1

        def fingerprint(self) -> dict[str, Any]:
            raise AssertionError("fingerprinted a bad file's sender")

    source = tmp_path / "requests.jsonl"
    source.write_bytes(_line("a", {"input": "fine"}) + b"\n" + _line("b", "not an object"))
    with pytest.raises(BatchFileInvalid) as refused:
        await run_batch_file(BatchFileJob(source, tmp_path / "out.jsonl"), Refuses())  # type: ignore[arg-type]
    assert [(e.line, e.code) for e in refused.value.errors] == [(3, "invalid_body")]  # (blank lines skipped)


# --- slow: processes killed mid-run, servers, Ray ----------------------------------------------------------------

def _embed(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedding_service", "embed", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """300 requests (9 bad bodies), and the output and error files of an uninterrupted in-process run."""
    folder = tmp_path_factory.mktemp("batch-file")
    bodies = {f"r{i}": ({"input": [f"resumable {i}", "x" + " y" * (i % 9)]} if i % 37 else {"input": ""})
              for i in range(300)}
    source = _requests(folder / "requests.jsonl", bodies)
    done = _embed("--batch-file", source, "-o", folder / "expected.jsonl", "--engine", "fake", "--concurrency", "1")
    assert done.returncode == 0, done.stderr
    assert "300 requests (291 completed, 9 failed)" in done.stderr
    return source, (folder / "expected.jsonl").read_bytes(), (folder / "expected.errors.jsonl").read_bytes()


@pytest.mark.slow
def test_killed_mid_run_then_rerun_gives_the_same_bytes(corpus: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    source, expected, expected_errors = corpus
    output = tmp_path / "out.jsonl"
    args = ("--batch-file", source, "-o", output, "--engine", "fake", "--concurrency", "1")  # (chunks of 64 lines)
    # Killed with a chunk appended but not recorded, then with the manifest half written: each rerun goes on.
    for fault in ("batch-appended:2", "manifest-mid-write:3"):
        killed = _embed(*args, env={"EMBEDDING_BULK_FAULT": fault})
        assert killed.returncode == -9, killed.stderr
        assert not output.exists() and work_dir(output).is_dir()
    finished = _embed(*args)
    assert finished.returncode == 0, finished.stderr
    assert "lines were done before (resumed)" in finished.stderr
    assert output.read_bytes() == expected  # no line lost or doubled, ids and all
    assert (tmp_path / "out.errors.jsonl").read_bytes() == expected_errors


@pytest.mark.slow
def test_two_url_servers_give_the_in_process_bytes(corpus: tuple[Path, bytes, bytes], tmp_path: Path,
                                                   server_factory: type[ServerProcess]) -> None:
    source, expected, expected_errors = corpus
    servers = [server_factory(["--engine", "fake"]) for _ in range(2)]
    for server in servers:
        server.wait_healthy(60)
    result = _embed("--batch-file", source, "-o", tmp_path / "out.jsonl", "--url", servers[0].url + "/v1",
                    "--url", servers[1].url, "--concurrency", "4")  # (with or without /v1: both work)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == expected
    assert (tmp_path / "out.errors.jsonl").read_bytes() == expected_errors
    for server in servers:  # both took part (291 good lines of 2 texts)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        texts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("embedding_texts_total")]
        assert texts and 0 < texts[0] < 582, (server.url, texts)


@pytest.mark.slow
@pytest.mark.skipif(not has_module("ray"), reason="needs ray (the bulk extra)")
def test_ray_local_gives_the_in_process_bytes(corpus: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    source, expected, _ = corpus
    result = _embed("--batch-file", source, "-o", tmp_path / "out.jsonl", "--ray", "local", "--ray-actors", "2",
                    "--engine", "fake", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == expected
