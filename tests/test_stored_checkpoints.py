"""Checkpoints saved before the layout move (tests/fixtures/pre_layout, written at eb6ded5) still load, and runs
stored mid-way still resume to what the old code computed when it resumed them."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from train_util import make_shards, tiny_config

import minicpm4
from minicpm4.spec.draft_training import DraftTrainArgs, train_draft
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.qat import QATConfig, run_qat
from minicpm4.train.trainer import train
from minicpm4.weights import checkpoint_files, read_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pre_layout"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
IDS = torch.tensor(EXPECTED["ids"])
LICENSE = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
needs_license = pytest.mark.skipif(not LICENSE.is_file(), reason=f"the fixtures' training text {LICENSE} is absent")

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model_dir: Path) -> torch.Tensor:
    model, _ = minicpm4.load(model_dir, dtype="fp32")
    with torch.no_grad():
        return model(IDS)[0, -4:, :8]


@pytest.mark.parametrize("name", ["train_run/checkpoints/step_0000004/model", "qat_ternary", "qat_float"])
def test_saved_model_directories_give_the_same_logits(name):
    torch.testing.assert_close(logits(FIXTURES / name), torch.tensor(EXPECTED[name]), atol=1e-5, rtol=0)


@needs_license
def test_training_run_resumes_to_the_old_codes_step_6(tmp_path):
    shutil.copytree(FIXTURES / "train_run", tmp_path / "run")
    tok = Tokenizer.from_dir(FIXTURES / "train_run/checkpoints/step_0000004/model")
    work = tmp_path / "data"
    work.mkdir()
    data = make_shards(work, LICENSE.read_text(), tok)
    cfg = tiny_config(data, tmp_path / "run", steps=6, save_every=4, warmup_steps=1, decay_steps=1, keep_checkpoints=2)
    result = train(cfg, resume=str(tmp_path / "run"))
    assert result["step"] == 6
    torch.testing.assert_close(logits(tmp_path / "run/checkpoints/step_0000006/model"),
                               torch.tensor(EXPECTED["train_run after 6 steps"]), atol=1e-4, rtol=0)


@needs_license
def test_interrupted_qat_run_resumes_to_the_old_codes_result(tmp_path):
    shutil.copy(FIXTURES / "qat_interrupted.qat-state.pt", tmp_path / "q.qat-state.pt")
    cfg = QATConfig(mode="ternary", steps=4, warmup=1, batch=2, seq_len=16, eval_every=4, save_every=2, eval_batches=1)
    logs = []
    run_qat(FIXTURES / "qat_float", tmp_path / "q", cfg, LICENSE.read_text()[:20000], log=logs.append)
    assert any(m.startswith("resumed at step 2") for m in logs), logs
    torch.testing.assert_close(logits(tmp_path / "q"), torch.tensor(EXPECTED["qat_interrupted resumed"]),
                               atol=1e-4, rtol=0)


@needs_license
def test_draft_training_resumes_to_the_old_codes_weights(tmp_path):
    target, tok = minicpm4.load(FIXTURES / "qat_float", dtype="fp32")
    shutil.copytree(FIXTURES / "draft", tmp_path / "draft")
    logs = []
    args = DraftTrainArgs(steps=6, seq_len=16, batch_size=2, lr=1e-3, max_windows=8, save_every=2)
    train_draft(target, tok.encode(LICENSE.read_text()[:3000]), tmp_path / "draft", args, log=logs.append)
    assert any("resumed" in m and "step 4" in m for m in logs), logs
    sums = {k: float(v.double().sum()) for k, v in read_state_dict(checkpoint_files(tmp_path / "draft"),
                                                                     torch.float32).items()}
    assert sums.keys() == EXPECTED["draft resumed to 6"].keys()
    for k, v in EXPECTED["draft resumed to 6"].items():
        assert sums[k] == pytest.approx(v, rel=1e-4, abs=1e-4), k
