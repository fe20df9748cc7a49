"""What typed vectors cost in retrieval quality, on real text, as a server returns them.

    python -m bench.studies.quantization_recall --url http://127.0.0.1:8890 \\
        --data ../shared/data/retrieval-docstrings.jsonl [--model NAME] [--unit-too]

(`--model`: the served model to ask. `--unit-too`: for a server with `int8_ranges` other than unit, also rank
int8/uint8 with the unit range [-1, 1], quantised here by the server's own vector_types.quantize from the
floats it returned: the bytes a unit server returns for them, as tests/test_cohere_clients.py checks.)

Embeds every document (input_type search_document) and query (search_query) through POST /v2/embed with
embedding_types float, int8, uint8 and ubinary in one call per batch, ranks all documents for each query, and
reports recall@10 and MRR@10 (each query's one relevant document is its own pair's; a document that ties with
it counts as ranked before it, which is what makes Hamming distances, integers, pay for their ties) for:
- float: cosine (the dot product of unit vectors);
- int8: the dot product of the int8 vectors (what a vector database storing them computes);
- uint8: Euclidean distance of the uint8 vectors (a dot product of uint8 is dominated by the +128 offset);
- binary: Hamming distance of the packed sign bits;
- binary + rescoring: the 100 nearest by Hamming, re-ranked by the float cosine of those 100.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import numpy as np

__all__ = ["main", "rank_metrics"]

TYPES = ["float", "int8", "uint8", "ubinary"]
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def _embed(url: str, texts: list[str], input_type: str, batch: int, model: str | None) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in TYPES}
    dtypes = {"float": np.float32, "int8": np.int8, "uint8": np.uint8, "ubinary": np.uint8}
    with httpx.Client(timeout=600) as client:
        for start in range(0, len(texts), batch):
            response = client.post(url + "/v2/embed", json={
                "texts": texts[start:start + batch], "input_type": input_type, "embedding_types": TYPES,
                "truncate": "END", **({"model": model} if model else {})})
            response.raise_for_status()
            for kind in TYPES:
                out[kind].append(np.array(response.json()["embeddings"][kind], dtype=dtypes[kind]))
    return {kind: np.concatenate(rows) for kind, rows in out.items()}


def rank_metrics(scores: np.ndarray, k: int = 10) -> tuple[float, float]:
    """recall@k and MRR@k where query i's relevant document is document i; higher scores rank first."""
    own = scores[np.arange(len(scores)), np.arange(len(scores))]
    rank = (scores >= own[:, None]).sum(axis=1) - 1  # documents ranked before the right one (ties: before it)
    hit = rank < k
    return float(hit.mean()), float(np.where(hit, 1.0 / (rank + 1), 0.0).mean())


def _hamming(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    out = np.empty((len(queries), len(documents)), dtype=np.int32)
    for i, query in enumerate(queries):
        out[i] = _POPCOUNT[np.bitwise_xor(documents, query)].sum(axis=1)
    return out


def _rescored(hamming: np.ndarray, cosine: np.ndarray, candidates: int) -> np.ndarray:
    """Only the `candidates` nearest by Hamming keep a score (their float cosine); the rest rank last."""
    nearest = np.argsort(hamming, axis=1, kind="stable")[:, :candidates]
    scores = np.full(cosine.shape, -np.inf, dtype=np.float64)
    rows = np.arange(len(cosine))[:, None]
    scores[rows, nearest] = cosine[rows, nearest]
    return scores


def _integer_rows(queries: dict[str, np.ndarray], docs: dict[str, np.ndarray], label: str
                  ) -> dict[str, np.ndarray]:
    """int8 ranked by the dot product of the codes, uint8 by their Euclidean distance (what a vector
    database storing them computes)."""
    int8 = queries["int8"].astype(np.int32) @ docs["int8"].astype(np.int32).T
    q8, d8 = queries["uint8"].astype(np.int64), docs["uint8"].astype(np.int64)
    uint8_l2 = (q8 ** 2).sum(1)[:, None] - 2 * q8 @ d8.T + (d8 ** 2).sum(1)[None, :]
    return {f"int8 (dot product){label}": int8.astype(np.float64),
            f"uint8 (Euclidean){label}": -uint8_l2.astype(np.float64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8890")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/retrieval-docstrings.jsonl"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default=None, help="the served model to ask (default: the server's)")
    parser.add_argument("--unit-too", action="store_true", help="also int8/uint8 with the unit ranges (docstring)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N pairs (0: all)")
    parser.add_argument("--candidates", type=int, default=100, help="binary + rescoring: how many to rescore")
    args = parser.parse_args()
    pairs = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.limit:
        pairs = pairs[: args.limit]
    started = time.perf_counter()
    docs = _embed(args.url, [p["document"] for p in pairs], "search_document", args.batch, args.model)
    queries = _embed(args.url, [p["query"] for p in pairs], "search_query", args.batch, args.model)
    seconds = time.perf_counter() - started
    cosine = queries["float"].astype(np.float64) @ docs["float"].astype(np.float64).T
    hamming = _hamming(queries["ubinary"], docs["ubinary"])
    label = " (the server's ranges)" if args.unit_too else ""
    rows = {
        "float (cosine)": cosine,
        **_integer_rows(queries, docs, label),
        "binary (Hamming)": -hamming.astype(np.float64),
        f"binary + float rescoring of the top {args.candidates}": _rescored(hamming, cosine, args.candidates),
    }
    if args.unit_too:
        from embedding_service.vector_types import quantize

        unit = [{kind: quantize(side["float"], kind) for kind in ("int8", "uint8")} for side in (queries, docs)]
        rows.update(_integer_rows(unit[0], unit[1], " (unit ranges [-1, 1])"))
    base = rank_metrics(cosine)[0]
    print(f"{len(pairs)} pairs, embedded in {seconds:.1f}s; bytes per vector: float "
          f"{docs['float'].shape[1] * 4}, int8/uint8 {docs['int8'].shape[1]}, binary {docs['ubinary'].shape[1]}")
    print("| vectors | recall@10 | MRR@10 | recall@10 vs float |")
    print("|---|---|---|---|")
    for name, scores in rows.items():
        recall, mrr = rank_metrics(scores)
        print(f"| {name} | {recall:.4f} | {mrr:.4f} | {100 * (recall - base) / base:+.2f}% |")


if __name__ == "__main__":
    main()
