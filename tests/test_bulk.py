"""`embedding-service embed` in this process on the fake engine: formats, ids, refusals, progress, resume checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.bulk.local import plan_batches
from embedding_service.bulk.readers import scan
from embedding_service.cli import main

FAKE = ["--engine", "fake", "--log-level", "WARNING"]


def reference(texts: list[str]) -> np.ndarray:
    """What the fake engine gives for each text (its vectors depend on the text alone)."""
    backend = FakeBackend(max_model_len=3072)
    return backend.embed(backend.tokenize(texts))


def embed(*args: str | Path) -> int:
    return main(["embed", *[str(a) for a in args], *FAKE])


def read_parquet(path: Path) -> tuple[list, np.ndarray]:
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    assert pa.types.is_fixed_size_list(column.type) and column.type.value_type == pa.float32()
    return table.column("id").to_pylist(), column.values.to_numpy().reshape(len(table), column.type.list_size)


def texts_of(n: int) -> list[str]:
    return [f"text {i} about {'word ' * (i % 7)}things" for i in range(n)]


def test_txt_is_split_on_newline_only(tmp_path: Path) -> None:
    texts = ["one\r", "two\u2028still two", "three\x0bthree", "four"]
    (tmp_path / "in.txt").write_bytes("\n".join(texts).encode())  # no final newline: still a row
    assert embed(tmp_path / "in.txt", "-o", tmp_path / "out.parquet") == 0
    ids, vectors = read_parquet(tmp_path / "out.parquet")
    assert ids == [0, 1, 2, 3]
    np.testing.assert_array_equal(vectors, reference(texts))


@pytest.mark.parametrize("chunk_rows", ["7", "8192"])
def test_every_format_round_trips_with_ids(tmp_path: Path, chunk_rows: str) -> None:
    texts = texts_of(50)
    ids = [f"doc-{i:03d}" for i in range(50)]
    pq.write_table(pa.table({"doc_id": ids, "body": texts}), tmp_path / "in.parquet", row_group_size=16)
    with (tmp_path / "in.jsonl").open("wb") as f:
        for i, t in zip(ids, texts, strict=True):
            f.write(orjson.dumps({"doc_id": i, "body": t}) + b"\n")
    with (tmp_path / "in.csv").open("w") as f:
        f.write("doc_id,body\n" + "".join(f'{i},"{t}"\n' for i, t in zip(ids, texts, strict=True)))
    want = reference(texts)
    for source in ("in.parquet", "in.jsonl", "in.csv"):
        out = tmp_path / f"{source}.out.parquet"
        assert embed(tmp_path / source, "-o", out, "--column", "body", "--id-column", "doc_id",
                     "--chunk-rows", chunk_rows, "--include-text") == 0
        got_ids, vectors = read_parquet(out)
        assert got_ids == ids, source
        assert pq.read_table(out).column("text").to_pylist() == texts
        np.testing.assert_array_equal(vectors, want)
    assert embed(tmp_path / "in.parquet", "-o", tmp_path / "v.npy", "--column", "body", "--chunk-rows", chunk_rows) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), want)
    assert embed(tmp_path / "in.parquet", "-o", tmp_path / "v.jsonl", "--column", "body", "--id-column", "doc_id",
                 "--chunk-rows", chunk_rows) == 0
    rows = [orjson.loads(line) for line in (tmp_path / "v.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in rows] == ids
    np.testing.assert_array_equal(np.array([r["embedding"] for r in rows], dtype=np.float32), want)


def test_csv_quoted_newlines_and_a_folder_and_a_glob(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [f"line {i},\nwith a comma and a newline" for i in range(9)]
    for part in range(3):
        with (folder / f"p{part}.csv").open("w") as f:
            f.write("text\n" + "".join(f'"{t}"\n' for t in texts[part * 3 : part * 3 + 3]))
    assert embed(folder, "-o", tmp_path / "a.parquet", "--chunk-rows", "2") == 0
    assert embed(str(folder / "p*.csv"), "-o", tmp_path / "b.parquet") == 0
    for name in ("a.parquet", "b.parquet"):
        ids, vectors = read_parquet(tmp_path / name)
        assert ids == list(range(9))  # positions over the files, in sorted order
        np.testing.assert_array_equal(vectors, reference(texts))


def test_null_text_names_the_row_or_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts: list[str | None] = ["a b", None, "c d", "", "e f"]
    pq.write_table(pa.table({"text": texts, "k": [10, 11, 12, 13, 14]}), tmp_path / "in.parquet")
    assert embed(tmp_path / "in.parquet", "-o", tmp_path / "out.parquet") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("in.parquet row 1: text is null (pass --skip-empty to skip such rows)")
    assert embed(tmp_path / "in.parquet", "-o", tmp_path / "out.parquet", "--skip-empty", "--id-column", "k") == 0
    ids, vectors = read_parquet(tmp_path / "out.parquet")
    assert ids == [10, 12, 14]
    np.testing.assert_array_equal(vectors, reference(["a b", "c d", "e f"]))
    assert "2 empty rows skipped" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n{"other": 1}\n')
    assert embed(tmp_path / "in.jsonl", "-o", tmp_path / "j.parquet") == 1
    assert capsys.readouterr().err.strip().endswith("in.jsonl:2: text is missing (pass --skip-empty to skip such rows)")


@pytest.mark.parametrize(("content", "args", "message"), [
    ("", (), "no rows to embed"),
    ('{"text": "a"}\n{"text": 5}\n', (), "in.jsonl:2: 'text' is int, not a string"),
    ('{"text": "a", "id": 1}\n{"text": "b", "id": "x"}\n', ("--id-column", "id"), "ids mix strings and integers"),
    ('{"text": "a"}\nnot json\n', (), "in.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n', ("--column", "body"), "in.jsonl:1: text is missing"),
    ('{"text": "a"}\n', ("--id-column", "id"), "in.jsonl:1: id 'id' is missing"),
])
def test_bad_jsonl_inputs_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                           args: tuple[str, ...], message: str) -> None:
    (tmp_path / "in.jsonl").write_text(content)
    assert embed(tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet", *args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_files_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "t.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    (tmp_path / "locked.txt").write_text("x\n")
    (tmp_path / "locked.txt").chmod(0)
    cases = [
        ((tmp_path / "t.parquet",), "no column 'text'; it has body, n"),
        ((tmp_path / "t.parquet", "--column", "n"), "column 'n' is int64, not text"),
        ((tmp_path / "broken.parquet",), "cannot read it as parquet"),
        ((tmp_path / "bad.txt",), "bad.txt:2: not valid UTF-8"),
        ((tmp_path / "missing.txt",), "does not exist"),
        ((tmp_path / "t.parquet", "--id-column", "nope", "--column", "body"), "no column 'nope'"),
        ((str(tmp_path / "*.nothing"),), "no files match"),
        ((tmp_path / "t.parquet", "-o", tmp_path / "x.csv"), "unknown format .csv"),
    ]
    if os.geteuid() != 0:  # root reads anything
        cases.append(((tmp_path / "locked.txt",), "not readable"))
    for args, message in cases:
        output = [] if "-o" in args else ["-o", tmp_path / "out.parquet"]
        assert embed(*args, *output) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("args", [
    ["--concurrency", "0", "--url", "http://127.0.0.1:1/v1"], ["--batch-size", "-3"], ["--chunk-rows", "0"],
    ["--retries", "x"], ["--dimensions", "0"], ["--url", "http://h/v1", "--dtype", "float32"],
    ["--ray", "--url", "http://h/v1"], ["--model", "m"], ["--log-every", "0"], ["--ray-actors", "0"],
])
def test_nonsense_is_refused_at_parse_time(tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(tmp_path / "never-read.txt"), "-o", str(tmp_path / "o.parquet"), *args])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_changed_settings_are_refused_and_a_finished_job_is_not_redone(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.txt").write_text("\n".join(texts_of(20)) + "\n")
    out = tmp_path / "out.parquet"
    assert embed(tmp_path / "in.txt", "-o", out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert embed(tmp_path / "in.txt", "-o", out) == 0
    assert "already complete" in capsys.readouterr().err
    assert embed(tmp_path / "in.txt", "-o", out, "--instruction", "Find it") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == before
    # An unfinished run (its work folder) with other settings: refused, naming what changed.
    (tmp_path / "in2.txt").write_text("\n".join(texts_of(20)) + "\n")
    env = {"EMBEDDING_BULK_FAULT": "manifest-renamed:3"}
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "embedding_service", "embed", str(tmp_path / "in2.txt"), "-o",
           str(tmp_path / "o2.parquet"), "--chunk-rows", "5", *FAKE]
    assert subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, timeout=120).returncode == -9
    assert embed(tmp_path / "in2.txt", "-o", tmp_path / "o2.parquet", "--chunk-rows", "5", "--dimensions", "32") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (dimensions: null -> 32)" in err[0]
    assert embed(tmp_path / "in2.txt", "-o", tmp_path / "o2.parquet", "--chunk-rows", "5") == 0
    assert "10 rows were done before (resumed)" in capsys.readouterr().err
    assert embed(tmp_path / "in2.txt", "-o", tmp_path / "o2.parquet", "--chunk-rows", "5", "--overwrite",
                 "--dimensions", "32") == 0
    assert read_parquet(tmp_path / "o2.parquet")[1].shape == (20, 32)


@pytest.mark.parametrize("suffix", ["npy", "jsonl"])
def test_a_finished_npy_or_jsonl_job_is_not_redone(tmp_path: Path, suffix: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """These formats cannot hold the fingerprint: an extended attribute does (a job killed after its work
    folder was removed, or simply run twice, then says it is done instead of refusing the output)."""
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("this file system keeps no user attributes")
    probe.unlink()
    (tmp_path / "in.txt").write_text("\n".join(texts_of(20)) + "\n")
    out = tmp_path / f"out.{suffix}"
    assert embed(tmp_path / "in.txt", "-o", out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert embed(tmp_path / "in.txt", "-o", out) == 0
    assert "is already complete (20 rows)" in capsys.readouterr().err  # rows counted from the file itself
    assert out.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "in.txt", out])  # nothing beside the output
    assert embed(tmp_path / "in.txt", "-o", out, "--instruction", "Find it") == 1  # other settings: refused
    assert "already exists" in capsys.readouterr().err


def test_nothing_is_written_outside_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out, cwd, tmp = (tmp_path / d for d in ("data", "out", "cwd", "tmp"))
    for folder in (data, out, cwd, tmp):
        folder.mkdir()
    (data / "in.txt").write_text("\n".join(texts_of(30)) + "\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    assert embed(data / "in.txt", "-o", out / "v.parquet", "--chunk-rows", "4") == 0
    assert [p.name for p in out.iterdir()] == ["v.parquet"]
    assert [p.name for p in data.iterdir()] == ["in.txt"]
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


def test_summary_and_plain_progress_lines_when_not_a_terminal(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.txt").write_text("\n".join(texts_of(40)) + "\n")
    assert main(["embed", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o.npy"), "--chunk-rows", "8",
                 "--log-every", "0.1", "--engine", "fake", "--fake-delay-ms", "60", "--max-batch-size", "4",
                 "--max-model-len", "32", "--max-batch-tokens", "32", "--log-level", "WARNING"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    progress = [line for line in err if "texts/s, elapsed" in line]
    assert progress and all("ETA" in line and "/40 rows" in line for line in progress)
    assert "\r" not in "".join(err)  # no bar drawn into a log
    tokens = sum(len(s) for s in FakeBackend().tokenize(texts_of(40)))
    assert err[-1].startswith(f"embedding-service embed: 40 rows, {tokens} tokens in ")
    assert "texts/s" in err[-1]


def test_batches_are_sorted_by_length_and_within_budgets() -> None:
    lengths = [5, 50, 7, 50, 3, 20, 20, 1]
    batches = plan_batches(lengths, max_batch_size=3, max_batch_tokens=100, padded=True)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches[0] == [1, 3]  # 50 x 2; a third would cost 150
    for batch in batches:
        assert len(batch) <= 3 and max(lengths[i] for i in batch) * len(batch) <= 100
    packed = plan_batches(lengths, max_batch_size=8, max_batch_tokens=100, padded=False)
    assert all(sum(lengths[i] for i in b) <= 100 for b in packed)


async def test_bulk_batches_of_a_packed_engine_are_bounded_by_tokens_alone() -> None:
    from embedding_service.bulk.local import batch_budget
    from embedding_service.engine.engine import EmbeddingEngine

    from .conftest import engine_options

    packed = EmbeddingEngine(FakeBackend(), engine_options(max_batch_size=4, max_batch_tokens=1000))
    padded = EmbeddingEngine(FakeBackend(padded=True), engine_options(max_batch_size=4, max_batch_tokens=1000))
    for engine in (packed, padded):
        await engine.start()
    try:
        assert batch_budget(packed) == (1000, 1000, False)  # vLLM-like: the scheduler takes what it is given
        assert batch_budget(padded) == (4, 1000, True)  # torch: max_batch_size still bounds padding waste
    finally:
        for engine in (packed, padded):
            await engine.stop()


def test_chunks_of_a_line_file_start_where_the_plan_says(tmp_path: Path) -> None:
    lines = [f"row {i}" + ("\r" if i % 3 == 0 else "") for i in range(23)]
    path = tmp_path / "in.txt"
    for ending in ("", "\n"):
        path.write_bytes("\n".join(lines).encode() + ending.encode())
        plan = scan([path], chunk_rows=5)
        assert plan.total_rows == 23
        assert [(c.start, c.stop) for c in plan.chunks] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
        assert plan.files[0].offsets[1] == len("\n".join(lines[:5]).encode()) + 1
