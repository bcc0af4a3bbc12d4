"""Survey fixtures: the planted source folder and its index (all-MiniLM-L6-v2 + bm25s + faiss), built once."""

import pytest
from survey_corpus import build_sources


@pytest.fixture(scope="session")
def survey_sources(tmp_path_factory):
    return build_sources(tmp_path_factory.mktemp("survey") / "sources")


@pytest.fixture(scope="session")
def survey_retriever(survey_sources, tmp_path_factory):
    from minicpm4.apps.survey.pipeline import make_retriever
    return make_retriever(survey_sources, tmp_path_factory.mktemp("survey_index") / "index", log=lambda m: None)
