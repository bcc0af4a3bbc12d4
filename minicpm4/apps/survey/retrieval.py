"""Hybrid retrieval: BM25 (bm25s) and dense (faiss) rankings fused by reciprocal rank (Cormack et al., 2009).

A search_engine call carries several queries; each query is ranked by both retrievers, and every ranking adds
1 / (RRF_K + rank) to a passage's score. Rank fusion needs no calibration between BM25 scores and cosines, and
a passage that several queries or both retrievers find rises above one that a single list ranks first.
RRF_K = 60 is the paper's constant. Ties break by passage id, so a search is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minicpm4.apps.survey.index import SurveyIndex, bm25_tokens
from minicpm4.apps.survey.sources import Passage

RRF_K = 60


@dataclass
class Hit:
    passage: Passage
    score: float


class Retriever:
    def __init__(self, index: SurveyIndex, embedder, depth: int = 50):
        self.index, self.embedder, self.depth = index, embedder, depth  # depth: ranks read from each list

    def bm25_ranking(self, query: str, depth: int) -> list[int]:
        vocab = self.index.bm25.vocab_dict
        tokens = [t for t in bm25_tokens([query])[0] if t in vocab]
        if not tokens:  # bm25s cannot score a query of unknown words; such a query simply has no BM25 list
            return []
        ids, scores = self.index.bm25.retrieve([tokens], k=depth, show_progress=False, n_threads=1)
        return [int(i) for i, s in zip(ids[0], scores[0]) if s > 0]

    def dense_rankings(self, queries: list[str], depth: int) -> list[list[int]]:
        vectors = self.embedder.embed(queries)
        _, ids = self.index.dense.search(np.ascontiguousarray(vectors, dtype=np.float32), depth)
        return [[int(i) for i in row if i >= 0] for row in ids]

    def search(self, queries: list[str], k: int) -> list[Hit]:
        queries = [q.strip() for q in queries if isinstance(q, str) and q.strip()]
        if not queries or k <= 0:
            return []
        depth = min(len(self.index.passages), max(self.depth, k))
        rankings = [self.bm25_ranking(q, depth) for q in queries] + self.dense_rankings(queries, depth)
        scores: dict[int, float] = {}
        for ranking in rankings:
            for rank, pid in enumerate(ranking):
                scores[pid] = scores.get(pid, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [Hit(self.index.passages[pid], score) for pid, score in best]
