"""Hybrid search through one server: dense + sparse (SPLADE) in Qdrant, fused by RRF, reranked.

    python -m bench.studies.hybrid --url http://127.0.0.1:8890 --documents 2603 \\
        --data ../shared/data/retrieval-docstrings.jsonl

The server serves three models from one models file (docs/hybrid.md): a dense embedding model (`--dense`),
a SPLADE model (`--sparse`, task sparse) and a reranker (`--reranker`). Every document is embedded both ways
(dense: POST /v1/embeddings; sparse: POST /embed_sparse) and stored as two named vectors of one point in
Qdrant's local mode (qdrant-client, in memory or `--qdrant-path`). Each query is searched four ways:
- dense: cosine on the dense vectors;
- sparse: dot product on the sparse vectors;
- hybrid: Qdrant's query API, both as prefetches (`--depth` each) fused with reciprocal rank fusion;
- hybrid + rerank: the hybrid list's top `--depth` reordered by POST /v1/rerank.
Each query's one relevant document is its own pair's; prints recall@10 and MRR@10 per stage.

With a ColBERT reranker (`task: multivector`), `--rerank-by-vectors` gets every document's and query's token
vectors once (POST /v1/embeddings, search_document / search_query) and scores the candidates by MaxSim here:
the server's /v1/rerank scores the same vectors the same way, but re-encodes a document for every query that
has it among its candidates (130,150 document encodings for the full set instead of 2,603). `--check-rerank N`
also reranks the first N queries through /v1/rerank and reports how often the two orders' top 10 agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["STAGES", "HybridRun", "exact_rankings", "load_pairs", "main", "maxsim_rerank", "metrics", "rrf",
           "run_hybrid", "token_vectors"]

STAGES = ["dense", "sparse", "hybrid", "hybrid + rerank"]
COLLECTION = "docstrings"
RRF_K = 2  # Qdrant's ranking constant
VOCABULARY = 1 << 20  # an upper bound on sparse indices (BERT's is 30,522)


@dataclass
class HybridRun:
    """Per stage, each query's ranked document indices (best first, `depth` long at most)."""

    rankings: dict[str, list[list[int]]]
    seconds: dict[str, float]
    exact: dict[str, list[list[int]]]  # dense, sparse, hybrid computed in numpy (the same exhaustive search)


def load_pairs(path: Path, limit: int = 0) -> list[dict[str, str]]:
    pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pairs[:limit] if limit else pairs


def metrics(ranking: Sequence[Sequence[int]], k: int = 10) -> tuple[float, float]:
    """recall@k and MRR@k where query i's one relevant document is document i."""
    hits = [list(ranked[:k]).index(i) + 1 if i in ranked[:k] else 0 for i, ranked in enumerate(ranking)]
    return sum(1 for h in hits if h) / len(hits), sum(1 / h for h in hits if h) / len(hits)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:500]}")
    return response.json()


def _batched(texts: list[str], batch: int, embed: Callable[[list[str]], list[Any]]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(texts), batch):
        out.extend(embed(texts[start:start + batch]))
    return out


def _dense(client: httpx.Client, model: str, texts: list[str], batch: int) -> list[list[float]]:
    def embed(chunk: list[str]) -> list[list[float]]:  # (MiniLM has no query/document prompts)
        data = _post(client, "/v1/embeddings", {"model": model, "input": chunk, "truncate": True})["data"]
        return [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
    return _batched(texts, batch, embed)


def _sparse(client: httpx.Client, model: str, texts: list[str], input_type: str, batch: int) -> list[Any]:
    from qdrant_client import models

    def embed(chunk: list[str]) -> list[Any]:
        answer = _post(client, "/embed_sparse", {"model": model, "inputs": chunk, "truncate": True,
                                                 "input_type": input_type})
        return [models.SparseVector(indices=[e["index"] for e in entries], values=[e["value"] for e in entries])
                for entries in answer]
    return _batched(texts, batch, embed)


def _rerank(client: httpx.Client, model: str, query: str, documents: list[str], candidates: list[int]) -> list[int]:
    if not candidates:
        return []
    answer = _post(client, "/v1/rerank", {"model": model, "query": query, "truncate": True,
                                          "documents": [documents[i] for i in candidates],
                                          "return_documents": False})
    return [candidates[result["index"]] for result in answer["results"]]


def token_vectors(client: httpx.Client, model: str, texts: list[str], input_type: str, batch: int) -> list[Any]:
    """A multi-vector model's (tokens, dim) float32 matrix per text (POST /v1/embeddings, base64)."""
    import base64

    import numpy as np

    def embed(chunk: list[str]) -> list[Any]:
        data = _post(client, "/v1/embeddings", {"model": model, "input": chunk, "truncate": True,
                                                "input_type": input_type, "encoding_format": "base64"})["data"]
        return [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").reshape(item["shape"])
                for item in sorted(data, key=lambda item: item["index"])]
    return _batched(texts, batch, embed)


def maxsim_rerank(query: Any, documents: list[Any], candidates: list[int]) -> list[int]:
    """`candidates` by ColBERT's MaxSim with `query`, best first (ties by position, as a stable sort)."""
    import numpy as np

    scores = [float((query @ documents[i].T).max(axis=1).sum()) for i in candidates]
    return [candidates[i] for i in np.argsort(-np.asarray(scores), kind="stable")]


def _top(scores: Any, depth: int) -> list[list[int]]:
    """Each row's `depth` best columns, best first (scores: a numpy matrix)."""
    import numpy as np

    best = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [[int(i) for i in row] for row in best]


def rrf(lists: Sequence[Sequence[int]], depth: int, k: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion as Qdrant computes it: sum over lists of 1 / (rank + k - 1), rank from 1."""
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, doc in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1 / (rank + k - 1)
    return sorted(scores, key=lambda doc: -scores[doc])[:depth]


def exact_rankings(doc_dense: list[list[float]], query_dense: list[list[float]], doc_sparse: list[Any],
                   query_sparse: list[Any], depth: int) -> dict[str, list[list[int]]]:
    """What Qdrant's local mode searches exhaustively, in numpy/scipy: cosine, sparse dot product, RRF."""
    import numpy as np
    from scipy.sparse import csr_matrix

    def unit(rows: list[list[float]]) -> Any:
        matrix = np.asarray(rows, dtype=np.float32)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    def sparse_matrix(vectors: list[Any]) -> Any:
        indptr = np.cumsum([0] + [len(v.indices) for v in vectors])
        indices = np.concatenate([np.asarray(v.indices, dtype=np.int64) for v in vectors])
        values = np.concatenate([np.asarray(v.values, dtype=np.float32) for v in vectors])
        return csr_matrix((values, indices, indptr), shape=(len(vectors), VOCABULARY))

    dense = _top(unit(query_dense) @ unit(doc_dense).T, depth)
    sparse = _top((sparse_matrix(query_sparse) @ sparse_matrix(doc_sparse).T).toarray(), depth)
    return {"dense": dense, "sparse": sparse,
            "hybrid": [rrf([d, s], depth) for d, s in zip(dense, sparse, strict=True)]}


def run_hybrid(url: str, pairs: list[dict[str, str]], *, dense: str = "minilm", sparse: str = "splade",
               reranker: str = "reranker", depth: int = 50, batch: int = 64, concurrency: int = 4,
               queries_limit: int = 0, qdrant_path: str | None = None, use_qdrant: bool = True,
               rerank_by_vectors: bool = False, check_rerank: int = 0) -> HybridRun:
    """Index the pairs' documents, search with each query (the first `queries_limit` only, if set), and
    return every stage's rankings. Without `use_qdrant` the searches are `exact_rankings` only. With
    `rerank_by_vectors` (a ColBERT reranker) the rerank stage is MaxSim over token vectors fetched once;
    `check_rerank` queries are also reranked by /v1/rerank (stage "rerank by /v1/rerank")."""

    documents = [p["document"] for p in pairs]
    queries = [p["query"] for p in pairs[:queries_limit or len(pairs)]]
    seconds: dict[str, float] = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        doc_dense = _dense(client, dense, documents, batch)
        doc_sparse = _sparse(client, sparse, documents, "search_document", batch)
        query_dense = _dense(client, dense, queries, batch)
        query_sparse = _sparse(client, sparse, queries, "search_query", batch)
        seconds["embed"] = time.perf_counter() - started
        _progress(f"embedded {len(documents)} documents and {len(queries)} queries in {seconds['embed']:.1f}s")
        exact = exact_rankings(doc_dense, query_dense, doc_sparse, query_sparse, depth)
        rankings = dict(exact) if not use_qdrant else _qdrant_rankings(
            doc_dense, query_dense, doc_sparse, query_sparse, depth, qdrant_path, seconds)
        for stage, found in rankings.items():
            _progress(f"{stage}: recall@10 / MRR@10 " + " / ".join(f"{m:.4f}" for m in metrics(found)))

        if not reranker:
            return HybridRun(rankings, seconds, exact)
        started = time.perf_counter()
        served = range(min(check_rerank, len(queries)) if rerank_by_vectors else len(queries))
        with ThreadPoolExecutor(concurrency) as pool:  # a few requests at a time: the server batches their pairs
            by_server = list(pool.map(
                lambda i: _rerank(client, reranker, queries[i], documents, rankings["hybrid"][i]), served))
        if not rerank_by_vectors:
            rankings["hybrid + rerank"] = by_server
        else:
            if by_server:
                rankings["rerank by /v1/rerank"] = by_server
            # (smaller requests: a batch's token vectors are bounded by the server's max_token_vectors_bytes)
            doc_vectors = token_vectors(client, reranker, documents, "search_document", max(1, batch // 8))
            query_vectors = token_vectors(client, reranker, queries, "search_query", max(1, batch // 8))
            rankings["hybrid + rerank"] = [maxsim_rerank(query_vectors[i], doc_vectors, rankings["hybrid"][i])
                                           for i in range(len(queries))]
        seconds["rerank"] = time.perf_counter() - started
    return HybridRun(rankings, seconds, exact)


def _qdrant_rankings(doc_dense: list[list[float]], query_dense: list[list[float]], doc_sparse: list[Any],
                     query_sparse: list[Any], depth: int, qdrant_path: str | None,
                     seconds: dict[str, float]) -> dict[str, list[list[int]]]:
    """Index into Qdrant's local mode (named dense + sparse vectors) and search: dense, sparse, and both as
    prefetches fused by Qdrant's RRF."""
    from qdrant_client import QdrantClient, models

    qdrant = QdrantClient(path=qdrant_path) if qdrant_path else QdrantClient(":memory:")
    try:
        started = time.perf_counter()
        if qdrant.collection_exists(COLLECTION):
            qdrant.delete_collection(COLLECTION)
        qdrant.create_collection(
            COLLECTION,
            vectors_config={"dense": models.VectorParams(size=len(doc_dense[0]), distance=models.Distance.COSINE)},
            sparse_vectors_config={"sparse": models.SparseVectorParams()})
        qdrant.upload_points(COLLECTION, [
            models.PointStruct(id=i, vector={"dense": doc_dense[i], "sparse": doc_sparse[i]})
            for i in range(len(doc_dense))])
        seconds["index"] = time.perf_counter() - started

        def search(stage: str, requests: list[models.QueryRequest]) -> list[list[int]]:
            found: list[list[int]] = []
            for start in range(0, len(requests), 256):
                answers = qdrant.query_batch_points(COLLECTION, requests[start:start + 256])
                found.extend([int(point.id) for point in answer.points] for answer in answers)
            _progress(f"{stage}: searched in Qdrant")
            return found

        started = time.perf_counter()
        rankings = {
            "dense": search("dense", [models.QueryRequest(query=q, using="dense", limit=depth)
                                      for q in query_dense]),
            "sparse": search("sparse", [models.QueryRequest(query=q, using="sparse", limit=depth)
                                        for q in query_sparse]),
            "hybrid": search("hybrid", [models.QueryRequest(
                prefetch=[models.Prefetch(query=d, using="dense", limit=depth),
                          models.Prefetch(query=s, using="sparse", limit=depth)],
                query=models.FusionQuery(fusion=models.Fusion.RRF), limit=depth)
                for d, s in zip(query_dense, query_sparse, strict=True)]),
        }
        seconds["search"] = time.perf_counter() - started
    finally:
        qdrant.close()
    return rankings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8890")
    parser.add_argument("--documents", type=int, default=0, help="only the first N pairs (0: all)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/retrieval-docstrings.jsonl"))
    parser.add_argument("--dense", default="minilm", help="the dense model's name in the models file")
    parser.add_argument("--sparse", default="splade", help="the sparse model's name")
    parser.add_argument("--reranker", default="reranker", help="the reranker's name ('': no rerank stage)")
    parser.add_argument("--depth", type=int, default=50, help="each prefetch's and the reranked list's length")
    parser.add_argument("--queries", type=int, default=0, help="search with the first N queries only (0: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--exact", action="store_true",
                        help="search in numpy instead of Qdrant's local mode (the same exhaustive search; fast)")
    parser.add_argument("--qdrant-path", default=None, help="a folder for Qdrant's local mode (default: memory)")
    parser.add_argument("--rerank-by-vectors", action="store_true",
                        help="a ColBERT reranker: MaxSim over token vectors fetched once per text (see above)")
    parser.add_argument("--check-rerank", type=int, default=0,
                        help="with --rerank-by-vectors: rerank the first N queries by /v1/rerank too, and compare")
    args = parser.parse_args()
    pairs = load_pairs(args.data, args.documents)
    result = run_hybrid(args.url, pairs, dense=args.dense, sparse=args.sparse, reranker=args.reranker,
                        depth=args.depth, batch=args.batch, queries_limit=args.queries,
                        qdrant_path=args.qdrant_path, use_qdrant=not args.exact,
                        rerank_by_vectors=args.rerank_by_vectors, check_rerank=args.check_rerank)
    timings = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in result.seconds.items())
    print(f"{len(pairs)} documents, {len(result.rankings['dense'])} queries; seconds: {timings}")
    print("| stage | recall@10 | MRR@10 |")
    print("|---|---|---|")
    for stage in [s for s in STAGES if s in result.rankings]:
        recall, mrr = metrics(result.rankings[stage])
        print(f"| {stage} | {recall:.4f} | {mrr:.4f} |")
    checked = result.rankings.get("rerank by /v1/rerank")
    if checked:
        same = sum(set(a[:10]) == set(b[:10]) for a, b in zip(checked, result.rankings["hybrid + rerank"],
                                                               strict=False))
        print(f"/v1/rerank and MaxSim here: the same top-10 set for {same} of {len(checked)} queries; on those "
              f"queries recall@10 / MRR@10 by /v1/rerank " + " / ".join(f"{m:.4f}" for m in metrics(checked)) +
              ", here " + " / ".join(f"{m:.4f}" for m in metrics(result.rankings["hybrid + rerank"][:len(checked)])))


if __name__ == "__main__":
    main()
