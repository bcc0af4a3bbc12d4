"""Run under torchrun by test_rl_objective.py: in the same two processes, an RL run of 4 steps, then one stopped
after 2 and resumed from its checkpoint by fresh objectives; each process writes its final weights' checksums
and rollout buffer size. Then the run of argv[2] (the config the test also runs in one process). argv: the
TrainConfig as JSON (out_dir gets /full and /cut), the single-process comparison's TrainConfig as JSON."""

import json
import sys
from pathlib import Path

import torch
from test_rl_objective import e_share

from minicpm4.train import process_group as pg
from minicpm4.train.rl.objective import RL
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train

torch.set_num_threads(1)
rank, world, _, _ = pg.init_process_group()
base = json.loads(sys.argv[1])
out = {}
for name, runs in (("full", [(None, None)]), ("cut", [(2, None), (None, "cut")])):
    cfg = TrainConfig.from_dict({**base, "out_dir": str(Path(base["out_dir"]) / name)})
    for stop, resume in runs:
        obj = RL.from_config(cfg, rank, world)
        obj.reward = e_share
        train(cfg, objective=obj, stop_after=stop, resume=cfg.out_dir if resume else None)
        out[f"{name}_buffer_{stop or 'end'}"] = obj.rollout.active
    w = torch.cat([p.detach().double().flatten() for p in obj.model.parameters()])
    out[name] = [float(w.sum()), float((w * torch.arange(len(w), dtype=torch.float64)).sum())]
(Path(base["out_dir"]) / f"rank{rank}.json").write_text(json.dumps(out))
one = TrainConfig.from_dict(json.loads(sys.argv[2]))
obj = RL.from_config(one, rank, world)
obj.reward = e_share
train(one, objective=obj)
torch.distributed.destroy_process_group()
