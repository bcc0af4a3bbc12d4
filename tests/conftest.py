"""Shared fixtures: the offline default model (fetched and verified once, see minicpm4/io/default_model.py)
and real English text for parity tests (Python's own LICENSE, or stdlib docstrings where it is absent)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: each worker (and the CLI subprocesses its tests start) gets cores / N threads. Two OpenMP teams
    # of 2 threads on 2 cores stall at every barrier whenever one thread is descheduled (a 40 s test took 280 s).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
import sysconfig
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and matmuls run faster on one thread: a second one mostly adds an OpenMP barrier per op, and
    stalls ~10x whenever another process holds a core. Modules opt in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=__import__("minicpm4.kernels.isa", fromlist=["supported"]).supported())
def tier(request, monkeypatch) -> str:
    """Each instruction-set tier of the native kernels this CPU runs (minicpm4/kernels/isa.py), forced through
    MINICPM4_ISA for the test; the test id names the tier. Skips where the kernels cannot be built."""
    from minicpm4 import kernels
    monkeypatch.setenv("MINICPM4_ISA", request.param)
    if kernels.native() is None:
        pytest.skip("the native kernels could not be built here (no C++ compiler or ninja; see the warning)")
    return request.param


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf; MINICPM4_TEST_GGUF overrides the default model cache."""
    override = os.environ.get("MINICPM4_TEST_GGUF")
    if override:
        return Path(override)
    from minicpm4.io.default_model import default_gguf_path
    return default_gguf_path()


@pytest.fixture(scope="session")
def real_text() -> str:
    license_txt = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_txt.is_file():
        return license_txt.read_text()
    import argparse, json, textwrap  # noqa: E401  (their docstrings are real English prose)
    return "\n\n".join(m.__doc__ for m in (argparse, json, textwrap))


@pytest.fixture(scope="session")
def smollm_checkpoint(smollm_gguf):
    """read_gguf(smollm_gguf), parsed once for all the GGUF and tokenizer tests."""
    from minicpm4.io.gguf import read_gguf
    return read_gguf(smollm_gguf)


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory, smollm_gguf) -> Path:
    """A tiny model trained (~20 s) that, under greedy decoding, answers any tool prompt in the json format with
    the call add(a=2, b=3) and, once the conversation ends in a tool result, with a fixed sentence; see
    tests/tool_model.py (ADD_TOOL, CALL, ANSWER)."""
    from tool_model import build_tool_model
    return build_tool_model(tmp_path_factory.mktemp("tool_model") / "model", smollm_gguf)
