"""Bulk embedding speed: `embedding-service embed` in-process against what a user would otherwise script.

    python -m bench.studies.bulk [--short 20000] [--long 2000] [--engines torch,vllm] [--dtype float32]

Two corpora of distinct generated texts (no cache helps anyone): `--short` texts of ~12 words and `--long`
texts of ~500 tokens (all-MiniLM-L6-v2, the bundled demo model, reads 256 of them: every peer truncates
there, as sentence-transformers does). Each measurement runs in a fresh process, so none inherits another's
threads or kernels, and is timed without its model load:

- `bulk-torch` / `bulk-vllm`: `embedding-service embed file.txt -o out.parquet` in-process (read, tokenise,
  embed, write parts, join the parquet), on the torch and the vLLM engine;
- `st`: sentence-transformers `encode` on the texts in memory (its own length sort, batch 32, normalised);
- `raw-torch`: the torch backend's `embed` on pre-tokenised, length-sorted batches of 32 (the ceiling);
- `llm-embed`: vLLM's `LLM.embed` on the texts in memory, all at once (its own scheduler), truncating at 256.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MAX_LEN = 256  # all-MiniLM-L6-v2's max_seq_length
MEASURES = ("bulk-torch", "st", "raw-torch", "bulk-vllm", "llm-embed")


def texts_for(count: int, words: int, seed: int) -> list[str]:
    """`count` distinct texts of `words` pseudo-words each."""
    from testkit.random_models import generated_corpus

    pool = " ".join(generated_corpus(words=count * words + 1000, seed=seed)).split()
    out = [" ".join(pool[i * words: (i + 1) * words]) + f" {i}" for i in range(count)]
    if len(set(out)) < count or len(pool) < count * words:
        raise SystemExit("not enough distinct texts generated")
    return out


def _settings(engine: str, dtype: str) -> Any:
    from embedding_service.config import EmbeddingConfig

    return EmbeddingConfig(_env_file=None, demo=True, engine=engine, dtype=dtype, truncate=True,  # type: ignore[call-arg]
                           max_model_len=MAX_LEN)


def measure(name: str, source: Path, dtype: str) -> dict[str, float]:
    """Seconds of one measurement (model load excluded, reported apart) in this process."""
    texts = source.read_text().splitlines()
    if name.startswith("bulk-"):
        from embedding_service.bulk import EmbedOptions, Job, LocalEmbedder, run_job

        embedder = LocalEmbedder(_settings(name.removeprefix("bulk-"), dtype), EmbedOptions())
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "out.parquet"
            summary = asyncio.run(run_job(Job([str(source)], out, overwrite=True, progress=False), embedder))
        load = (embedder.engine.load_seconds if embedder.engine is not None else 0.0) or 0.0
        return {"seconds": summary.seconds - load, "load_s": load}
    from embedding_service.backends.model.resolve import demo_model_dir

    model_dir = demo_model_dir()
    started = time.perf_counter()
    if name == "st":
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_dir, device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
        model.encode(texts[:64], batch_size=32)
        load, started = time.perf_counter() - started, time.perf_counter()
        with torch.inference_mode():
            model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    elif name == "raw-torch":
        from embedding_service.backends import BackendOptions, read_model_facts
        from embedding_service.backends.torch.embed import TorchBackend

        backend = TorchBackend(BackendOptions.from_config(_settings("torch", dtype), model_dir,
                                                          read_model_facts(model_dir)))
        backend.load()
        seqs = sorted((ids[: MAX_LEN - 1] + ids[-1:] if len(ids) > MAX_LEN else ids
                       for ids in backend.tokenize(texts)), key=len, reverse=True)
        backend.embed(seqs[:32])
        load, started = time.perf_counter() - started, time.perf_counter()
        for start in range(0, len(seqs), 32):
            backend.embed(seqs[start: start + 32])
    elif name == "llm-embed":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from vllm import LLM

        llm = LLM(model=model_dir, runner="pooling", dtype=dtype, max_model_len=MAX_LEN, enable_prefix_caching=False)
        cut = {"truncation": True, "max_length": MAX_LEN}
        llm.embed(texts[:64], use_tqdm=False, tokenization_kwargs=cut)
        load, started = time.perf_counter() - started, time.perf_counter()
        llm.embed(texts, use_tqdm=False, tokenization_kwargs=cut)
    else:
        raise SystemExit(f"unknown measurement {name}")
    return {"seconds": time.perf_counter() - started, "load_s": load}


def _in_fresh_process(name: str, source: Path, dtype: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "bench.studies.bulk", "--measure", name, "--file", str(source),
                           "--dtype", dtype], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=20000, help="texts of ~12 words")
    parser.add_argument("--long", type=int, default=2000, help="texts of ~500 tokens")
    parser.add_argument("--engines", default="torch,vllm", help="torch: bulk, st, raw; vllm: bulk, LLM.embed")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)  # one measurement (internal)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.file), args.dtype)))
        return
    engines = args.engines.split(",")
    names = [n for n in MEASURES if n.endswith("torch") or n == "st"] if "torch" in engines else []
    names += ["bulk-vllm", "llm-embed"] if "vllm" in engines else []
    results: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "dtype": args.dtype, "max_len": MAX_LEN,
                               "command": " ".join(["python -m bench.studies.bulk", *sys.argv[1:]]), "corpora": {}}
    with tempfile.TemporaryDirectory() as folder:
        for corpus, count, words in (("short", args.short, 12), ("long", args.long, 150)):
            if not count:
                continue
            source = Path(folder) / f"{corpus}.txt"
            source.write_text("\n".join(texts_for(count, words, seed=len(corpus))) + "\n")
            rows: dict[str, Any] = {}
            for name in names:
                row = _in_fresh_process(name, source, args.dtype)
                row["texts_per_s"] = round(count / row["seconds"], 1)
                rows[name] = row
                print(f"{corpus} {name}: {row}", flush=True)
            ratios = {}
            for ours, peer in (("bulk-torch", "raw-torch"), ("bulk-torch", "st"), ("bulk-vllm", "llm-embed"),
                               ("bulk-torch", "llm-embed")):
                if ours in rows and peer in rows:
                    ratios[f"{ours}/{peer}"] = round(rows[peer]["seconds"] / rows[ours]["seconds"], 3)
            results["corpora"][corpus] = {"texts": count, "words": words, "rows": rows, "ratios": ratios}
            print(f"{corpus} ratios: {ratios}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
