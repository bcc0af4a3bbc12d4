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
from minicpm4.errors import CheckpointError
from minicpm4.spec.draft_training import train_draft
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.checkpoint import list_checkpoints
from minicpm4.train.train_config import TrainConfig
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
    (tmp_path / "text.txt").write_text(LICENSE.read_text()[:20000])
    cfg = TrainConfig.for_task("qat", model=str(FIXTURES / "qat_float"), out_dir=str(tmp_path / "q"), steps=4,
                               data=str(tmp_path / "text.txt"), warmup_steps=1, batch_size=2, seq_len=16,
                               eval_every=4, save_every=2, qat={"mode": "ternary", "eval_batches": 1})
    logs = []
    train(cfg, log=logs.append)  # the old state file resumes through the one checkpoint path
    assert any(m.startswith("resumed at step 2") for m in logs), logs
    assert not (tmp_path / "q.qat-state.pt").exists() and not (tmp_path / "q.qat-run").exists()
    torch.testing.assert_close(logits(tmp_path / "q"), torch.tensor(EXPECTED["qat_interrupted resumed"]),
                               atol=1e-4, rtol=0)


@needs_license
def test_old_qat_state_with_other_settings_is_refused(tmp_path):
    shutil.copy(FIXTURES / "qat_interrupted.qat-state.pt", tmp_path / "q.qat-state.pt")
    (tmp_path / "text.txt").write_text(LICENSE.read_text()[:20000])
    cfg = TrainConfig.for_task("qat", model=str(FIXTURES / "qat_float"), out_dir=str(tmp_path / "q"), steps=4,
                               data=str(tmp_path / "text.txt"), warmup_steps=1, batch_size=2, seq_len=16,
                               eval_every=4, save_every=2, seed=1, qat={"mode": "ternary", "eval_batches": 1})
    with pytest.raises(CheckpointError, match=r"q.qat-state.pt: saved by a run with other settings: seed \(0 -> 1\)"):
        train(cfg)
    assert (tmp_path / "q.qat-state.pt").is_file() and not list_checkpoints(tmp_path / "q.qat-run")


@needs_license
def test_draft_training_resumes_to_the_old_codes_weights(tmp_path):
    target, tok = minicpm4.load(FIXTURES / "qat_float", dtype="fp32")
    shutil.copytree(FIXTURES / "draft", tmp_path / "draft")
    logs = []
    # the old trainer's warmup was 10 steps whatever `steps` (its CLI took min(10, steps)): this run never left it
    cfg = TrainConfig.for_task("draft", out_dir=str(tmp_path / "draft"), steps=6, warmup_steps=10, seq_len=16,
                               batch_size=2, lr=1e-3, save_every=2, draft={"max_windows": 8})
    train_draft(cfg, target, tok.encode(LICENSE.read_text()[:3000]), log=logs.append)
    assert any("resumed" in m and "step 4" in m for m in logs), logs
    assert not (tmp_path / "draft/checkpoint.pt").exists()  # now a checkpoint of the one path, continued to step 6
    assert (tmp_path / "draft/checkpoints/latest").read_text().strip() == "step_0000006"
    sums = {k: float(v.double().sum()) for k, v in read_state_dict(checkpoint_files(tmp_path / "draft"),
                                                                     torch.float32).items()}
    assert sums.keys() == EXPECTED["draft resumed to 6"].keys()
    for k, v in EXPECTED["draft resumed to 6"].items():
        assert sums[k] == pytest.approx(v, rel=1e-4, abs=1e-4), k
