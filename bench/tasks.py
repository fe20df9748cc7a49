"""Sparse (SPLADE) and multi-vector (ColBERT) throughput beside the dense model, on the same texts:
`python -m bench --tasks` (or `python -m bench.tasks`).

    python -m bench --tasks --colbert /tmp/colbert-minilm [--splade-tiny DIR] [--texts 256] [--repeat 3]

Every model runs in this process on the torch engine, through the path bulk `embed` takes (engine.prepare, the
server's batch budgets, one batch after another: bulk/tasks.py), so the figures are the models' and their
task code's, without HTTP. Models, all on all-MiniLM-L6-v2's encoder where they can be, so that the
differences are the tasks' own costs:
- `dense`: all-MiniLM-L6-v2 (the demo model: mean pooling, normalised);
- `splade-minilm`: the same encoder with a masked-LM head (BertForMaskedLM from MiniLM's weights, its head
  transform untrained, the decoder tied to the word embeddings, as BERT's): SPLADE's cost at MiniLM's size, the
  vocabulary projection (30,522 x 384 multiply-adds a token) included;
- `colbert-minilm`: a ColBERT model on the same encoder (scripts/colbert_minilm.py; `--colbert`);
- `splade-tiny`: the real SPLADE-tiny-msmarco (2 layers, hidden 128), where its folder is given.
Documents (~150 tokens, inside ColBERT's 180-token document length) and queries (~15 tokens; ColBERT's
expand to 32) are timed separately, each model in turn within a round (A B C A B C ...), and ratios taken
per round (a shared machine drifts; only ratios within a round mean anything); the order rotates by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "run_tasks"]


def _texts(count: int, seed: int) -> dict[str, list[str]]:
    """Distinct documents of ~150 MiniLM tokens and queries of ~15 (bench/workloads.py's generator)."""
    from tokenizers import Tokenizer

    from bench.workloads import TextMaker, Workload
    from embedding_service.backends.model.resolve import demo_model_dir

    tokenizer = Tokenizer.from_file(str(Path(demo_model_dir()) / "tokenizer.json"))
    tokenizer.no_truncation()  # (MiniLM's tokenizer.json truncates at 128: count the real length)
    tokenizer.no_padding()
    maker = TextMaker(seed)
    maker.TARGETS = {"short": 15, "long": 150}
    maker.calibrate(lambda texts: [len(e.ids) for e in tokenizer.encode_batch(texts)])
    documents = [t for r in maker.requests(Workload("documents", "long", 1, 1), count) for t in r]
    queries = [t for r in maker.requests(Workload("queries", "short", 1, 1), count, salt=1) for t in r]
    return {"documents": documents, "queries": queries}


def _splade_minilm(folder: Path) -> Path:
    """all-MiniLM-L6-v2's encoder under a masked-LM head (BertForMaskedLM; the head transform untrained)."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from embedding_service.backends.model.resolve import demo_model_dir

    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(demo_model_dir())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(folder)
    return folder


async def _engines(models: dict[str, tuple[str, str]], dtype: str) -> dict[str, Any]:
    from embedding_service.config import EmbeddingConfig
    from embedding_service.service import build_engine, plan_model

    engines = {}
    for name, (path, role) in models.items():
        settings = EmbeddingConfig(_env_file=None, model_path=path, engine="torch", device="cpu",  # type: ignore[call-arg]
                                   dtype=dtype, truncate=True)
        engine = build_engine(plan_model(settings, role))
        await engine.start()
        engines[name] = engine
    return engines


def _time_side(engine: Any, texts: list[str], side: str) -> tuple[float, int]:
    """Seconds to prepare and run `texts` as bulk does, and the tokens the model ran (markers, expansion)."""
    from embedding_service.bulk.local import chunk_batches, prepare_chunk
    from embedding_service.bulk.tasks import chunk_task

    input_type = {"documents": "search_document", "queries": "search_query"}[side]
    task = chunk_task(engine, input_type=None if engine.task == "embed" else input_type)
    started = time.perf_counter()
    seqs = prepare_chunk(task, texts)
    for batch in chunk_batches(engine, seqs):
        task.run([seqs[i] for i in batch])
    return time.perf_counter() - started, sum(len(s) for s in seqs)


def run_tasks(args: argparse.Namespace) -> dict[str, Any]:
    from embedding_service.backends.model.resolve import demo_model_dir
    from embedding_service.engine.types import EMBED, MULTIVECTOR, SPARSE

    scratch = tempfile.TemporaryDirectory()
    models = {"dense": (demo_model_dir(), EMBED),
              "splade-minilm": (str(_splade_minilm(Path(scratch.name) / "splade-minilm")), SPARSE)}
    if args.colbert:
        models["colbert-minilm"] = (args.colbert, MULTIVECTOR)
    if args.splade_tiny:
        models["splade-tiny"] = (args.splade_tiny, SPARSE)
    loop = asyncio.new_event_loop()  # (the engines start and stop on one loop)
    engines = loop.run_until_complete(_engines(models, args.dtype))
    texts = _texts(args.texts, args.seed)
    rows: list[dict[str, Any]] = []
    try:
        for engine in engines.values():  # warm-up: one batch of each side, not timed
            for side, batch in texts.items():
                _time_side(engine, batch[:16], side)
        names = list(engines)
        for round_no in range(1, args.repeat + 1):
            first = (round_no - 1) % len(names)
            order = names[first:] + names[:first]  # each model first in turn: no place bias
            for side, batch in texts.items():
                for name in order:
                    engine = engines[name]
                    seconds, tokens = _time_side(engine, batch, side)
                    rows.append({"round": round_no, "side": side, "model": name, "seconds": seconds,
                                 "texts": len(batch), "tokens": tokens})
                    print(f"round {round_no} {side:9s} {name:15s} {len(batch) / seconds:8.1f} texts/s "
                          f"({tokens} tokens)", file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            loop.run_until_complete(engine.stop())
        loop.close()
        scratch.cleanup()
    return {"rows": rows, "summary": _summary(rows, list(engines))}


def _summary(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per side and model: median texts/s, and the median (min-max) of its per-round time ratio to dense."""
    out = []
    for side in ("documents", "queries"):
        timed = {(r["round"], r["model"]): r for r in rows if r["side"] == side}
        rounds = sorted({r for r, _ in timed})
        for name in names:
            ratios = [timed[(r, name)]["seconds"] / timed[(r, "dense")]["seconds"] for r in rounds]
            out.append({"side": side, "model": name, "tokens": timed[(rounds[0], name)]["tokens"],
                        "texts_per_s": statistics.median(timed[(r, name)]["texts"] / timed[(r, name)]["seconds"]
                                                         for r in rounds),
                        "time_vs_dense": statistics.median(ratios), "min": min(ratios), "max": max(ratios)})
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = ["| side | model | tokens run | texts/s (median) | time / dense's (median, range) |",
             "|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['side']} | {row['model']} | {row['tokens']} | {row['texts_per_s']:.1f} | "
                     f"{row['time_vs_dense']:.2f}x ({row['min']:.2f}-{row['max']:.2f}) |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--colbert", default=None, help="a ColBERT model folder (scripts/colbert_minilm.py)")
    parser.add_argument("--splade-tiny", default=None, help="SPLADE-tiny-msmarco's folder (docs/sparse.md)")
    parser.add_argument("--texts", type=int, default=256, help="documents and queries, each")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the rows and summary here (JSON)")
    args = parser.parse_args(argv)
    result = run_tasks(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
