"""The server tests' model: the default GGUF in fp32 (batched decode then equals one-at-a-time exactly), run by the
C++ decode stack as `serve` runs it. Module scope: each test file loads its own (xdist keeps files whole)."""

import pytest

import minicpm4
from minicpm4.model.native_stack import attach


@pytest.fixture(scope="module")
def model_tok(smollm_gguf):
    model, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    return attach(model), tok
