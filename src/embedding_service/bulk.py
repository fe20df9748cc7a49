"""Bulk embedding of a file through any OpenAI-compatible server, with a progress bar.

`embedding-service embed texts.txt -o vectors.npy --url http://localhost:8890/v1`
Input: a .txt file (one text per line, blank lines skipped) or .jsonl (a "text" field per line).
Output: .npy (float32 matrix, rows in input order) or .jsonl ({"index", "embedding"} per line).
Requests run concurrently; 429/503 answers are retried after their Retry-After; other errors stop the run.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson

__all__ = ["embed_file", "read_texts", "write_vectors"]

_RETRYABLE = {429, 502, 503, 504}


def read_texts(path: Path, field: str = "text") -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [str(orjson.loads(line)[field]) for line in lines if line.strip()]
    return [line for line in lines if line.strip()]


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, vectors.astype(np.float32))
        return
    with path.open("wb") as out:
        for index, row in enumerate(vectors):
            out.write(orjson.dumps({"index": index, "embedding": row}, option=orjson.OPT_SERIALIZE_NUMPY))
            out.write(b"\n")


async def _post_batch(client: object, url: str, payload: dict, attempts: int) -> np.ndarray:
    import httpx

    assert isinstance(client, httpx.AsyncClient)
    for attempt in range(attempts):
        response = await client.post(url, json=payload)
        if response.status_code == 200:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])
        if response.status_code not in _RETRYABLE or attempt == attempts - 1:
            raise RuntimeError(f"server answered {response.status_code}: {response.text[:500]}")
        await asyncio.sleep(float(response.headers.get("retry-after", "1") or 1))
    raise AssertionError("unreachable")


async def embed_file(texts: Sequence[str], *, url: str, api_key: str | None = None, model: str | None = None,
                     instruction: str | None = None, batch_size: int = 64, concurrency: int = 4,
                     dimensions: int | None = None, attempts: int = 8, progress: bool = True) -> np.ndarray:
    """Embed `texts` in batches over HTTP; returns float32 rows in input order."""
    import httpx
    from tqdm import tqdm

    endpoint = url.rstrip("/") + "/embeddings"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    results: list[np.ndarray | None] = [None] * len(batches)
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(texts), unit="text", disable=not progress)

    async def run(index: int, client: httpx.AsyncClient) -> None:
        payload: dict[str, object] = {"input": batches[index], "encoding_format": "base64",
                                      "model": model or "default"}
        if instruction:
            payload["instruction"] = instruction
        if dimensions:
            payload["dimensions"] = dimensions
        async with limit:
            results[index] = await _post_batch(client, endpoint, payload, attempts)
        bar.update(len(batches[index]))

    try:
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(300.0)) as client:
            await asyncio.gather(*(run(i, client) for i in range(len(batches))))
    finally:
        bar.close()
    if not batches:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate([r for r in results if r is not None])
