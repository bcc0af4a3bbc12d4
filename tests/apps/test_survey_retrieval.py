"""Hybrid retrieval over the planted folder: planted passages are found by keyword queries (BM25 and dense),
by paraphrases that share no keyword with them (dense only), and the on-disk index is reused or rebuilt."""

import os
import shutil

from survey_corpus import GLIMMERFISH, MARMOT, QUILLON, ZORBLAX

from minicpm4.apps.survey.index import open_index
from minicpm4.apps.survey.retrieval import Retriever


def top_texts(retriever, queries, k):
    return [h.passage.text for h in retriever.search(queries, k)]


def test_planted_passages_are_found(survey_retriever):
    cases = [(["quaternary handshake", "Zorblax protocol"], ZORBLAX), (["liquid bismuth cooling"], QUILLON),
             (["glimmerfish violet moonlight"], GLIMMERFISH), (["marmot hibernation burrows"], MARMOT)]
    for queries, planted in cases:
        hits = top_texts(survey_retriever, queries, 3)
        assert any(planted in t for t in hits[:1]), (queries, hits)


def test_dense_retrieval_finds_paraphrases_bm25_cannot(survey_retriever):
    # no word of the query (after stopwords) occurs in the planted passage: only the embedding can match it
    query = "luminous fish reproduce at night"
    assert not any(survey_retriever.index.passages[i].text.startswith("Lagoon")
                   for i in survey_retriever.bm25_ranking(query, 5))
    assert GLIMMERFISH in top_texts(survey_retriever, [query], 1)[0]
    assert MARMOT in top_texts(survey_retriever, ["sleeping through the winter in the mountains"], 1)[0]


def test_search_is_deterministic_and_sized(survey_retriever):
    first = [h.passage.id for h in survey_retriever.search(["threads", "json"], 5)]
    assert first == [h.passage.id for h in survey_retriever.search(["threads", "json"], 5)]
    assert len(first) == 5 and len(set(first)) == 5
    assert survey_retriever.search(["   "], 5) == [] and survey_retriever.search(["zzqx unknownword"], 0) == []
    assert len(survey_retriever.search(["qqqq nothing matches this"], 3)) == 3  # the dense side always ranks


def test_index_is_reused_and_rebuilt_when_sources_change(survey_sources, survey_retriever, tmp_path):
    src = shutil.copytree(survey_sources, tmp_path / "src")
    embedder, logs = survey_retriever.embedder, []
    index = open_index(src, tmp_path / "index", embedder, log=logs.append)
    stamp = os.stat(tmp_path / "index" / "dense.faiss").st_mtime_ns
    again = open_index(src, tmp_path / "index", embedder, log=logs.append)
    assert os.stat(tmp_path / "index" / "dense.faiss").st_mtime_ns == stamp and len(logs) == 1  # no rebuild
    assert [p.text for p in again.passages] == [p.text for p in index.passages]
    (src / "new.txt").write_text("Velvet ants are wasps whose wingless females sting hard enough to stun a bird.")
    rebuilt = open_index(src, tmp_path / "index", embedder, log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert len(rebuilt.passages) == len(index.passages) + 1
    assert "Velvet ants" in top_texts(Retriever(rebuilt, embedder), ["wingless wasp"], 1)[0]
    assert not any(p.name.endswith(".tmp") or p.name.endswith(".old") for p in tmp_path.iterdir())


def test_endpoint_embeddings_match_the_local_model(survey_retriever):
    import numpy as np
    import pytest
    from fake_openai import FakeEndpoint, serving

    from minicpm4.apps.survey.embedders import EmbeddingError, EndpointEmbedder

    local = survey_retriever.embedder
    texts = ["threads share memory", "processes do not", "asyncio runs one event loop"]
    scale = lambda ts: [3.0 * v for v in local.embed(ts)]  # noqa: E731  (unnormalised, as some servers send)
    with serving(FakeEndpoint(lambda p: "", embed=scale)) as url:
        remote = EndpointEmbedder(url, "minilm", batch_size=2).embed(texts)
    np.testing.assert_allclose(remote, local.embed(texts), atol=1e-5)
    with serving(FakeEndpoint(lambda p: "", embed=lambda ts: local.embed(ts)[:1])) as url:
        with pytest.raises(EmbeddingError, match="1 embeddings for 3 inputs"):
            EndpointEmbedder(url, "minilm").embed(texts)
