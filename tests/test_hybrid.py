"""The hybrid search example (bench/studies/hybrid.py, docs/hybrid.md) on a real server: MiniLM, SPLADE-tiny and
a random ColBERT reranker (task multivector) from one models file, docstring pairs in Qdrant's local mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.studies.hybrid import load_pairs, metrics, run_hybrid

from .conftest import serving

pytestmark = pytest.mark.slow
pytest.importorskip("qdrant_client")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval-docstrings.jsonl"
DOCUMENTS = 100
QUERIES = 30  # of those pairs: each searches all 100 documents (queries and reranking are the slow part)
DEPTH = 20  # each prefetch's length, the fused list's and the reranked one's (the example's default is 50)
RRF_K = 2  # Qdrant's ranking constant


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory, splade_tiny_dir: Path, colbert_dir: Path) -> Iterator:
    if not DATA.is_file():
        pytest.skip(f"{DATA} is not here")
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(f"""models:
  - name: minilm
    demo: true
  - name: splade
    model_path: {splade_tiny_dir}
    task: sparse
  - name: reranker
    model_path: {colbert_dir}
    task: multivector
""")
    for server in serving(["--models-file", str(path), "--engine", "torch", "--dtype", "float32",
                           "--device", "cpu", "--log-level", "WARNING"]):
        yield run_hybrid(server.url, load_pairs(DATA, DOCUMENTS), depth=DEPTH, queries_limit=QUERIES,
                         rerank_by_vectors=True, check_rerank=QUERIES)


def test_dense_and_sparse_find_the_relevant_documents(hybrid) -> None:
    chance = 10 / DOCUMENTS
    assert len(hybrid.rankings["dense"]) == QUERIES
    for stage in ("dense", "sparse"):
        recall, mrr = metrics(hybrid.rankings[stage])
        assert recall > max(0.5, 5 * chance), (stage, recall)  # chance is 0.1; real models find most
        assert 0 < mrr <= recall


def _rrf(lists: list[list[int]]) -> dict[int, float]:
    """Reciprocal rank fusion as Qdrant defines it: sum over lists of 1 / (rank + k - 1), rank from 1, k = 2."""
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, doc in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1 / (rank + RRF_K - 1)
    return scores


def test_hybrid_is_the_reciprocal_rank_fusion_of_both_lists(hybrid) -> None:
    dense, sparse, fused = (hybrid.rankings[s] for s in ("dense", "sparse", "hybrid"))
    from_dense_only = from_sparse_only = 0
    for d, s, f in zip(dense, sparse, fused, strict=True):
        assert len(f) == DEPTH and len(set(f)) == DEPTH
        scores = _rrf([d, s])
        fused_scores = [scores[doc] for doc in f]  # KeyError: a document neither list found
        assert fused_scores == sorted(fused_scores, reverse=True)
        assert min(fused_scores) >= sorted(scores.values(), reverse=True)[DEPTH - 1]  # the best DEPTH of them
        from_dense_only += len(set(f[:10]) - set(s))
        from_sparse_only += len(set(f[:10]) - set(d))
    assert from_dense_only and from_sparse_only  # each list brings documents the other missed
    recall = {stage: metrics(hybrid.rankings[stage])[0] for stage in ("dense", "sparse", "hybrid")}
    assert recall["hybrid"] >= min(recall["dense"], recall["sparse"]), recall


def test_qdrant_searches_as_the_exact_computation(hybrid) -> None:
    """bench/studies/hybrid.py --exact (numpy/scipy, used for the full 2,603-pair run) ranks as Qdrant's local mode."""
    for stage in ("dense", "sparse", "hybrid"):
        qdrant, exact = hybrid.rankings[stage], hybrid.exact[stage]
        same = sum(set(q[:10]) == set(e[:10]) for q, e in zip(qdrant, exact, strict=True))
        assert same >= QUERIES - 2, (stage, same)  # near-identical docstrings tie: their order may differ
        for ours, theirs in zip(metrics(exact), metrics(qdrant), strict=True):
            assert abs(ours - theirs) <= 0.04, (stage, metrics(exact), metrics(qdrant))


def test_rerank_reorders_the_hybrid_list(hybrid) -> None:
    fused, served = hybrid.rankings["hybrid"], hybrid.rankings["rerank by /v1/rerank"]
    for reranked in (served, hybrid.rankings["hybrid + rerank"]):
        assert all(sorted(r) == sorted(f) for f, r in zip(fused, reranked, strict=True))  # same ones, new order
        assert sum(r != f for f, r in zip(fused, reranked, strict=True)) > len(fused) // 2


def test_maxsim_over_fetched_token_vectors_ranks_as_the_servers_rerank(hybrid) -> None:
    """--rerank-by-vectors (the full run's way: each text's token vectors once) orders as /v1/rerank (fp32)."""
    served, here = hybrid.rankings["rerank by /v1/rerank"], hybrid.rankings["hybrid + rerank"]
    assert sum(a == b for a, b in zip(served, here, strict=True)) >= QUERIES - 2
