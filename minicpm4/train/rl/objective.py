"""The RL objective of the one training loop (train/objective.py's seam): GRPO with DAPO's refinements and
MiniCPM4's stabilisers, on samples from chunk-wise rollout (MiniCPM4 technical report, Algorithm 1).

One optimizer step (policy version v = the step's index = optimizer steps applied so far):
1. next_batch(v): refresh the KL reference when v is a multiple of rl.ref_refresh; then the step's rollout
   (ChunkRollout.draw, end_step) until this process holds batch_size / world / G groups: the buffer's unfinished
   samples resume, new prompts fill rl.max_active slots as they free, and every sample generates at most
   rl.chunk_tokens tokens in the step under the current weights (version v); when the batch is complete, samples
   still running are cut and stay in the rollout buffer with their per-token log-probs and versions (vanilla
   rollout, chunk_tokens = max_len, and servers run whole rounds instead: rollout.py). Each completed group is
   rewarded (the task's reward on the decoded response); with dynamic sampling, groups whose rewards are all equal
   are dropped and more rollout refills the batch, informative groups beyond it are carried to the next step.
   After rl.max_draws draws (a draw: rollout until the groups still missing complete, or one vanilla round) the
   batch is topped up with dropped groups (zero advantage: they add only the KL
   term and tokens to the average; counted in the metric `topped_up`). Then GRPO advantages, the garble filter,
   and (no grad) the reference's log-probs (rl.kl_coef > 0) and, with chunk_importance off, the current weights'.
2. loss(mb): batch.batch_loss on the micro-batch, i.e. loss.policy_loss, which returns a mean over its own kept
   tokens (token-level) or kept samples (sample-level). The loop wants this micro-batch's share of the global mean:

       objective_mb = mean_mb * n_mb * world / N        n_mb: the micro-batch's kept tokens (samples); N: the global
                                                        batch's (counts[0], summed over processes by the loop)

   so after DDP averages the gradients over `world` processes, the gradient is that of
   sum_mb mean_mb * n_mb / N = sum over every kept token of the global batch / N: the global token-level mean.

The engine runs on the policy model object itself (not a copy): Engine.step runs under inference_mode on the same
parameters AdamW updates, so each round samples with exactly the weights of the current version with no sync cost
and no second copy in memory. It needs the whole model in one process, hence parallel=ddp (each process rolls out
its own prompts: process r takes task indices r, r + world, ...). The model has no dropout, so the engine putting it
in eval mode does not change the learner's forward. dtype fp32 (the rl default) keeps the learner's log-probs equal
to the engine's; under bf16 autocast the importance ratio also carries the bf16 rounding.

With rl.rollout_urls the rounds run on OpenAI-compatible servers instead (remote.py): before the step's first
round, the policy is written (the checkpoint writer, safetensors) and every server reloads it as version `step`;
the servers report the version each chunk was sampled with, which tags its tokens. Start the servers in fp32
(`minicpm4 serve --dtype fp32`) so their log-probs are the learner's. Evaluation stays in process.

Exact resume: state_dict holds the next task index, the rollout's buffer of unfinished samples (tokens, log-probs,
versions, each sample's generator state), its finished samples of incomplete groups, the carried
groups with their rewards, and the reference model's weights with the step it was refreshed at. The loop restores
the global RNG. Rollout metrics (reward, rollout_s, ...) are this process's; the loss metrics are global.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Hashable

import torch

from minicpm4.config import PRESETS
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import ConfigError
from minicpm4.io.loader import load
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.checkpoint import write_model_dir
from minicpm4.train.mup import param_groups
from minicpm4.train.objective import Objective
from minicpm4.train.rl.batch import RLBatch, batch_loss, from_groups
from minicpm4.train.rl.dynamic_sampling import fill_batch, informative
from minicpm4.train.rl.logprobs import token_logprobs
from minicpm4.train.rl.loss import LossSettings
from minicpm4.train.rl.reference import ReferenceModel
from minicpm4.train.rl.remote import RemoteBackend
from minicpm4.train.rl.rollout import ChunkRollout, EngineBackend, Group, RolloutSettings, Sample, idle_share
from minicpm4.train.rl.task_source import REWARDS, RewardFn, TaskSource
from minicpm4.train.train_config import TrainConfig

SUMS = ("loss", "pg_loss", "kl", "ratio_mean", "clip_low", "clip_high", "dual_clip")  # loss: per counts[0]


class RL(Objective):
    def __init__(self, cfg: TrainConfig, model: MiniCPM4ForCausalLM, tokenizer: Tokenizer,
                 reward: RewardFn | None = None, rank: int = 0, world: int = 1):
        """reward(text, task) -> Reward: default REWARDS[cfg.rl.reward] (tests pass their own)."""
        super().__init__(cfg)
        r = cfg.rl
        self.model, self.config, self.tokenizer = model, model.config, tokenizer
        self.reward = reward or REWARDS[r.reward]
        self.rank, self.world = rank, world
        local = cfg.batch_size // world
        if cfg.batch_size % world or local % r.group_size:
            raise ConfigError(f"batch_size ({cfg.batch_size}) must split into whole groups of rl.group_size "
                              f"({r.group_size}) on each of {world} processes")
        self.groups = local // r.group_size  # groups this process trains per step
        self.max_active = r.max_active or local
        if self.max_active < r.group_size:
            raise ConfigError(f"rl.max_active ({r.max_active}) must hold at least one group of rl.group_size "
                              f"({r.group_size})")
        if r.max_len >= model.config.max_position_embeddings:
            raise ConfigError(f"rl.max_len ({r.max_len}) leaves no room for a prompt in the model's "
                              f"max_position_embeddings ({model.config.max_position_embeddings})")
        self.settings = LossSettings(r.eps_low, r.eps_high, r.dual_clip_c or None, r.token_level,
                                     r.chunk_importance, r.kl_coef, r.overlong_filter, r.garble_filter)
        self.source = TaskSource(tokenizer, cfg.seed, r.task_max_steps, r.chat_template, small=r.task == "chain_small")
        # training skips a task whose question is a held-out one, so the reward curve is on unseen questions (the
        # streams are disjoint by seed; with one-digit numbers a short question can still come up in both)
        self.held_out = {self.source.task(("held-out", i)).question for i in range(r.eval_prompts)}
        self.engine = Engine(model, max_slots=self.max_active)  # rollout by default; evaluation always
        self.remote = _remote_backend(cfg, model.config, rank, world) if r.rollout_urls else None
        self.rollout = ChunkRollout(self.remote or EngineBackend(self.engine),
                                    RolloutSettings(r.group_size, r.chunk_tokens, r.max_len,
                                                    seed=cfg.seed, stream=r.stream))
        self.reference = ReferenceModel(model, r.ref_refresh) if r.kl_coef > 0 else None
        self.next_index = rank  # the next training task this process rolls out
        self.carry: list[Group] = []  # informative groups beyond a batch, for the next step
        self.stats: dict[str, float] = {}  # the last next_batch's rollout metrics
        self._seen: list[float] = []  # rewards of every group completed in this step's rollout
        self._step_t0 = 0.0  # perf_counter at the start of this step's rollout

    @classmethod
    def from_config(cls, cfg: TrainConfig, rank: int = 0, world: int = 1) -> "RL":
        if cfg.model in PRESETS:
            raise ConfigError(f"model: rl trains a loadable model (a directory from `train sft`, a .gguf, or "
                              f"default), not the untrained preset {cfg.model!r}")
        model, tokenizer = load(cfg.model, dtype="fp32", config_overrides=cfg.model_overrides or None)
        if cfg.tokenizer:
            tokenizer = Tokenizer.from_dir(cfg.tokenizer)
        if tokenizer is None:
            raise ConfigError("rl needs a tokenizer: start from a model directory with one, or set tokenizer")
        return cls(cfg, model.requires_grad_(True), tokenizer, rank=rank, world=world)

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        if self.reference is not None:
            self.reference.model.to(device)

    def param_groups(self) -> list[dict]:
        cfg = self.cfg
        return param_groups(self.model, cfg.lr, cfg.weight_decay, cfg.init_std, cfg.mup)

    # ---- rollout ----
    def _prompts(self):
        while True:  # lazily: refill_round pulls only the prompts it has room for
            key = self.next_index
            self.next_index += self.world
            if self.source.task(key).question not in self.held_out:
                yield key, self.source.prompt_ids(key)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _rewarded(self, groups: list[Group]) -> list[Group]:
        for g in groups:
            task = self.source.task(g.key)
            g.rewards = [float(self.reward(self._decode(s.tokens), task).value) for s in g.samples]
            self._seen += g.rewards
        return groups

    def _draw(self, version: int):
        """Rollout until at least one group completes (streaming: until the groups still missing from the batch
        complete); those groups, rewarded."""
        dynamic = self.cfg.rl.dynamic_sampling
        have = [sum(informative(g.rewards) for g in self.carry) if dynamic else len(self.carry)]

        def draw() -> list[Group]:
            while True:
                done = self.rollout.draw(self._prompts(), version, self.max_active, max(1, self.groups - have[0]))
                if done:
                    self._rewarded(done)
                    have[0] += sum(informative(g.rewards) for g in done) if dynamic else len(done)
                    return done
        return draw

    def next_batch(self, step: int) -> dict[str, torch.Tensor]:
        r = self.cfg.rl
        if self.reference is not None:
            self.reference.maybe_refresh(self.model, step)
        if self.remote is not None:  # the servers sample with this step's weights (a no-op once they do)
            self.remote.publish(step, lambda d: write_model_dir(d, self.config, self.model.state_dict(),
                                                                self.tokenizer))
        t0, rounds0, self._seen = time.perf_counter(), len(self.rollout.history), []
        self._step_t0 = t0
        draw, dropped, topped = self._draw(step), 0, 0
        if r.dynamic_sampling:
            filled = fill_batch(draw, self.groups, self.carry, r.max_draws)
            groups, self.carry, dropped = filled.groups, filled.carry, filled.dropped
            spare = filled.dropped_groups
            while len(groups) < self.groups:  # draws ran out: top up with zero-advantage groups
                spare = spare or draw()
                groups.append(spare.pop())
                topped += 1
        else:
            groups, self.carry = list(self.carry), []
            while len(groups) < self.groups:
                groups += draw()
            groups, self.carry = groups[:self.groups], groups[self.groups:]
        self.rollout.end_step()  # requests still running keep their tokens and resume next step
        rollout_s = time.perf_counter() - t0
        # right-padded with id 0: causal attention never lets a pad after a sequence change its logits
        batch = from_groups(groups, self._decode, std_normalize=r.std_normalize)
        out = {"input_ids": batch.input_ids, "mask": batch.mask, "behavior_logp": batch.behavior_logp,
               "versions": batch.versions, "truncated": batch.truncated, "advantages": batch.advantages,
               "garbled": batch.garbled,
               "rewards": torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float32)}
        device = next(self.model.parameters()).device
        with torch.no_grad():
            ids = batch.input_ids.to(device)
            if self.reference is not None:
                out["ref_logp"] = self.reference.logprobs(ids).cpu()
            if not r.chunk_importance:  # pi_old of standard PPO: the weights before this step's update
                out["prox_logp"] = token_logprobs(self.model, ids).cpu()
        self.stats = self._rollout_stats(out, step, rounds0, rollout_s, dropped, topped)
        if self.world == 1 and self.counts(out)[0] == 0:  # (under DDP the loop checks the global count)
            raise ConfigError(f"step {step + 1}: every sample was dropped from the loss ({self.stats['truncated']:.0%} "
                              f"truncated at rl.max_len {r.max_len}, {self.stats['garbled']:.0%} garbled); raise "
                              "rl.max_len, or turn off rl.overlong_filter / rl.garble_filter")
        return out

    def _rollout_stats(self, b, step, rounds0, rollout_s, dropped, topped) -> dict[str, float]:
        rounds = self.rollout.history[rounds0:]
        slot_steps = sum(x.offered for x in rounds)  # 0 on servers, whose steps are not observable
        resp = b["mask"].sum(1).float()
        lag = (step - b["versions"])[b["mask"]].float()  # policy versions between sampling a token and now
        # reward: of the trained batch (dynamic sampling keeps only mixed groups); reward_rollout: of every group
        # this step's rollout completed, dropped and carried ones included (the unbiased curve; absent when the
        # step trained only on groups carried from the last)
        seen = {"reward_rollout": sum(self._seen) / len(self._seen)} if self._seen else {}
        return {"reward": b["rewards"].mean().item(), **seen, "solved": (b["rewards"] >= 1).float().mean().item(),
                "groups_dropped": float(dropped), "topped_up": float(topped), "rounds": float(len(rounds)),
                "rollout_s": rollout_s,
                **({"idle_share": idle_share(sum(x.busy for x in rounds), 1, slot_steps)} if slot_steps else {}),
                "response_len": resp.mean().item(), "truncated": b["truncated"].float().mean().item(),
                "garbled": b["garbled"].float().mean().item(), "buffered": float(self.rollout.active),
                "version_lag": lag.mean().item() if lag.numel() else 0.0}

    # ---- the loss ----
    def tokens(self, batch):
        return int(batch["mask"].sum())  # response tokens (the tok/s metric)

    def _kept(self, batch) -> torch.Tensor:
        keep = torch.ones_like(batch["truncated"], dtype=torch.bool)
        if self.settings.overlong_filter:
            keep &= ~batch["truncated"].bool()
        if self.settings.garble_filter:
            keep &= ~batch["garbled"].bool()
        return keep

    def counts(self, batch):
        """[the loss's denominator: kept tokens (token-level) or kept samples, kept tokens]."""
        keep = self._kept(batch)
        n_tok = (batch["mask"] & keep[:, None]).sum().double()
        return torch.stack([n_tok if self.settings.token_level else keep.sum().double(), n_tok])

    def loss(self, net, mb, counts, world):
        """sums: [loss x its denominator, then pg_loss, kl, ratio_mean, clip shares, each x kept tokens]."""
        b = RLBatch(mb["input_ids"], mb["mask"], mb["behavior_logp"], mb["versions"], mb["truncated"],
                    mb["advantages"], mb["garbled"])
        mean, m = batch_loss(net, b, self.settings, ref_logp=mb.get("ref_logp"), prox_logp=mb.get("prox_logp"),
                             rows_per_pass=mb["input_ids"].shape[0])
        n_mb = m["tokens"] if self.settings.token_level else m["samples_kept"]
        objective = mean * (n_mb * world / counts[0].float())
        sums = torch.tensor([m["loss"] * n_mb] + [m[k] * m["tokens"] for k in SUMS[1:]], dtype=torch.float64)
        return objective, sums

    def metrics(self, sums, counts):
        out = {"loss": (sums[0] / counts[0]).item()}
        out.update({k: (sums[i] / counts[1].clamp(min=1)).item() for i, k in enumerate(SUMS) if i})
        # step_s: wall time from the step's first rollout round to its last backward (rollout, the no-grad
        # reference / proximal log-probs, forward and backward; not the optimizer update or evaluation)
        return {**out, **self.stats, "step_s": time.perf_counter() - self._step_t0}

    def evaluate(self, step: int) -> dict[str, float]:
        """Mean reward of greedy responses to rl.eval_prompts held-out tasks (with eval_every > 0)."""
        r = self.cfg.rl
        keys = [("held-out", i) for i in range(r.eval_prompts)]
        params = SamplingParams(max_new_tokens=r.max_len, temperature=0.0)
        outs = self.engine.generate([self.source.prompt_ids(k) for k in keys], params)
        rewards = [self.reward(self._decode(o.token_ids), self.source.task(k)).value for k, o in zip(keys, outs)]
        return {"eval_reward": sum(rewards) / len(rewards)}

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        """{"world", "ranks": every process's rollout state (gathered: called on every rank), "reference"?}."""
        ro = self.rollout
        local = {"next_index": self.next_index,
                 "buffer": [_sample_state(s) for s in ro.buffer],
                 "finished": [[k, [_sample_state(s) for s in v]] for k, v in ro.finished.items()],
                 "prompts": [[k, list(p)] for k, p in ro.prompts.items()],
                 "carry": [{"key": g.key, "prompt": list(g.prompt), "rewards": list(g.rewards),
                            "samples": [_sample_state(s) for s in g.samples]} for g in self.carry]}
        ranks = [local]
        if self.world > 1:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, local)
        state = {"world": self.world, "ranks": ranks}
        if self.reference is not None:  # the same on every process (refreshed from DDP-synchronised weights)
            state["reference"] = {k: v.detach().cpu().clone() for k, v in self.reference.model.state_dict().items()}
            state["reference_refreshed_at"] = self.reference.refreshed_at
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["world"]) != self.world:
            raise ConfigError(f"the checkpoint's rollouts belong to {state['world']} processes; resume with as many "
                              f"(this run has {self.world})")
        ro, mine = self.rollout, state["ranks"][self.rank]
        self.next_index = int(mine["next_index"])
        ro.buffer = [_sample(d) for d in mine["buffer"]]
        ro.finished = {_key(k): [_sample(d) for d in v] for k, v in mine["finished"]}
        ro.prompts = {_key(k): list(p) for k, p in mine["prompts"]}
        self.carry = [Group(_key(g["key"]), list(g["prompt"]), [_sample(d) for d in g["samples"]], list(g["rewards"]))
                      for g in mine["carry"]]
        if self.reference is not None:
            if "reference" not in state:
                raise ConfigError("rl.kl_coef > 0 but the checkpoint holds no reference model (saved with kl_coef 0)")
            self.reference.model.load_state_dict(state["reference"])
            self.reference.refreshed_at = int(state["reference_refreshed_at"])

    def save_model(self, directory: Path, state) -> None:
        write_model_dir(directory, self.config, state, self.tokenizer)

    def load_model(self, state, extra) -> None:
        if self.config.tie_word_embeddings:  # the HF file omits the tied head
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
        self.model.load_state_dict({**state, **extra})


def _remote_backend(cfg: TrainConfig, config, rank: int, world: int) -> RemoteBackend:
    """rl.rollout_urls as this process's RemoteBackend; keys from the environment variables the config names."""
    r = cfg.rl
    urls = r.rollout_urls[rank::world] if len(r.rollout_urls) >= world else r.rollout_urls
    key = os.environ.get(r.rollout_key_env) or None
    admin = os.environ.get(r.rollout_admin_key_env) or key
    weights = Path(r.rollout_weights_dir or Path(cfg.out_dir) / "rollout_weights") / f"rank{rank}"
    return RemoteBackend(urls, config.vocab_size, config.max_position_embeddings, config.eos_token_ids, weights,
                         key, admin)


def _key(k) -> Hashable:
    return tuple(k) if isinstance(k, list) else k


def _sample_state(s: Sample) -> dict[str, Any]:
    return {"key": s.key, "index": s.index, "prompt": list(s.prompt), "generator": s.generator.get_state(),
            "tokens": list(s.tokens), "logprobs": list(s.logprobs), "versions": list(s.versions),
            "finish_reason": s.finish_reason}


def _sample(d: dict[str, Any]) -> Sample:
    gen = torch.Generator()
    gen.set_state(d["generator"])
    return Sample(_key(d["key"]), int(d["index"]), list(d["prompt"]), gen, list(d["tokens"]), list(d["logprobs"]),
                  list(d["versions"]), d["finish_reason"])
