"""Bulk embedding speed: `embedding-service embed` in-process vs sentence-transformers `encode` vs the raw backend.

    python -m bench.bulk [--texts 20000] [--words 12] [--engine torch] [--dtype float32] [--rounds 2]

One process, so all three share torch's thread count and the loaded kernels; the texts are generated and distinct
(no cache helps anyone). Bulk is timed end to end minus model load: reading the file, tokenising, embedding,
writing parts and joining the parquet output. sentence-transformers gets the texts in memory (its own length
sort, batch 32, normalised); the raw ceiling is backend.embed on pre-tokenised, length-sorted batches of 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def texts_for(count: int, words: int) -> list[str]:
    from embedding_service.testing import generated_corpus

    seen: dict[str, None] = {}
    for line in generated_corpus(words=count * words * 2):
        seen.setdefault(" ".join(line.split()[:words]), None)
        if len(seen) >= count:
            break
    if len(seen) < count:
        raise SystemExit(f"only {len(seen)} distinct texts generated")
    return list(seen)


def run_bulk(texts_file: Path, out: Path, engine: str, dtype: str) -> tuple[float, float]:
    from embedding_service.bulk import EmbedOptions, Job, LocalEmbedder, run_job
    from embedding_service.config import EmbeddingConfig

    settings = EmbeddingConfig(_env_file=None, demo=True, engine=engine, dtype=dtype)  # type: ignore[call-arg]
    embedder = LocalEmbedder(settings, EmbedOptions())
    summary = asyncio.run(run_job(Job([str(texts_file)], out, overwrite=True, progress=False), embedder))
    load = embedder.engine.load_seconds if embedder.engine is not None else 0.0
    return summary.seconds - (load or 0.0), load or 0.0


def run_st(texts: list[str], model_dir: str) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:64], batch_size=32)
    started = time.perf_counter()
    with torch.inference_mode():
        model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    return time.perf_counter() - started


def run_raw(texts: list[str], model_dir: str, dtype: str) -> float:
    from embedding_service.backends.torch_backend import TorchBackend

    backend = TorchBackend(model_dir, device="cpu", dtype=dtype, max_model_len=512, matryoshka=False,
                           model_label="demo")
    backend.load()
    seqs = sorted(backend.tokenize(texts), key=len, reverse=True)
    backend.embed(seqs[:32])
    started = time.perf_counter()
    for start in range(0, len(seqs), 32):
        backend.embed(seqs[start : start + 32])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--engine", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from embedding_service.backends.resolve import demo_model_dir

    texts = texts_for(args.texts, args.words)
    model_dir = demo_model_dir()
    results: dict[str, Any] = {"texts": len(texts), "words": args.words, "engine": args.engine, "dtype": args.dtype,
                               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rounds": []}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "texts.txt"
        source.write_text("\n".join(texts) + "\n")
        warm = Path(folder) / "warm.txt"
        warm.write_text("\n".join(texts[:64]) + "\n")
        run_bulk(warm, Path(folder) / "warm.parquet", args.engine, args.dtype)
        for _ in range(args.rounds):
            bulk_s, load_s = run_bulk(source, Path(folder) / "out.parquet", args.engine, args.dtype)
            st_s = run_st(texts, model_dir)
            raw_s = run_raw(texts, model_dir, args.dtype)
            n = len(texts)
            results["rounds"].append({
                "bulk_texts_per_s": round(n / bulk_s, 1), "st_texts_per_s": round(n / st_s, 1),
                "raw_texts_per_s": round(n / raw_s, 1), "bulk_vs_st": round(st_s / bulk_s, 3),
                "bulk_vs_raw": round(raw_s / bulk_s, 3), "model_load_s": round(load_s, 1)})
            print(json.dumps(results["rounds"][-1]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
