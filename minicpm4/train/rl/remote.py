"""Rollout on OpenAI-compatible servers: RemoteBackend, the second backend of rollout.ChunkRollout (the same chunk
bookkeeping as in process), through the `openai` client.

Per chunk, one /v1/completions request (jobs spread round-robin over the servers, sent concurrently):
    prompt = prompt ids + the sample's tokens so far    max_tokens = the chunk's budget
    temperature 1, top_p 1, logprobs 0                  seed = the sample's generator.initial_seed()
    extra body: return_token_ids (vLLM's name): the generated ids, a final stop token included, so nothing is
                re-tokenized; stop_token_ids + ignore_eos (vLLM's): stop exactly on the rollout's stop ids;
                seed_offset (ours): tokens already drawn from the seed, so the chunk continues the sample's stream
The answer's logprobs.token_logprobs are the behaviour log-probs; its weight_version tags the chunk.

Weights: publish(version, write) writes the policy into a fresh directory (write = the trainer's checkpoint
writer, safetensors) and POSTs /update_weights_from_disk {"model_path", "weight_version"} (SGLang's endpoint and
fields; ours takes an integer version) to every server with the admin key; each server drains its running
requests, swaps, and reports the version. The directory must be readable by the servers at the same path (one
machine or a shared filesystem).

Which servers: ours (minicpm4 serve) implements all of the above and is what the tests run. Neither vLLM nor SGLang
is tested here, and neither works unchanged: vLLM has return_token_ids, stop_token_ids and ignore_eos but no
seed_offset (it restarts the seed at every chunk, so a sample's chunks would reuse the same draws) and reloads
weights through its dev-mode routes (VLLM_SERVER_DEV_MODE=1, POST /collective_rpc), not this endpoint; SGLang has
/update_weights_from_disk (a string weight_version, reported by /get_weight_version, not per completion) but
neither seed_offset nor token ids in this response form.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from minicpm4.errors import ConfigError
from minicpm4.train.rl.rollout import BackendRound, Chunk, Sample


class RemoteBackend:
    max_slots = 0  # a server's decode slots are its own: no idle-slot accounting

    def __init__(self, urls: Sequence[str], vocab_size: int, max_len: int, eos_token_ids: Sequence[int],
                 weights_dir: str | Path, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 4):
        """urls: base URLs (http://host:port, without /v1); max_len: the context the rollout may fill (the model's);
        eos_token_ids: the stop ids when the rollout names none; admin_key: for reloads (default api_key)."""
        try:
            import openai
        except ImportError:
            raise ConfigError("rl.rollout_urls needs the openai package: pip install openai") from None
        if not urls:
            raise ConfigError("RemoteBackend needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.vocab_size, self.max_len, self.eos = vocab_size, max_len, [int(t) for t in eos_token_ids]
        self.weights_dir = Path(weights_dir)
        # max_retries: a full queue answers 429, which the client retries with backoff
        self.clients = [openai.OpenAI(base_url=u + "/v1", api_key=api_key or "none", timeout=timeout,
                                      max_retries=max_retries) for u in self.urls]
        self.admins = [openai.OpenAI(base_url=u, api_key=admin_key or api_key or "none", timeout=timeout,
                                     max_retries=0) for u in self.urls]
        self.models: list[str | None] = [None] * len(self.urls)
        self.version: int | None = None  # the version last published (None: what the servers hold is unknown)
        self._published: Path | None = None
        self._openai = openai

    # ---- weights ----
    def publish(self, version: int, write: Callable[[Path], None]) -> None:
        """Make every server serve the policy of `version` (a no-op when it already does): write(dir) writes the
        weights into a new directory, then each server reloads it. ConfigError naming the server that refuses."""
        if version == self.version:
            return
        target = self.weights_dir / f"v{version:07d}"
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        write(target)
        for url, admin in zip(self.urls, self.admins):
            try:
                got = admin.post("/update_weights_from_disk", cast_to=object,
                                 body={"model_path": str(target.resolve()), "weight_version": version})
            except self._openai.APIError as e:
                raise ConfigError(f"rollout server {url} refused the weight reload: {e}") from None
            if not isinstance(got, dict) or got.get("weight_version") != version:
                raise ConfigError(f"rollout server {url} answered the weight reload with {got!r}, not version "
                                  f"{version}")
        if self._published is not None and self._published != target:
            shutil.rmtree(self._published, ignore_errors=True)  # every server has moved past it
        self._published, self.version = target, version

    # ---- chunks ----
    def run(self, jobs: Sequence[tuple[Sample, int]], stop_token_ids: list[int] | None) -> BackendRound:
        stops = self.eos if stop_token_ids is None else [int(t) for t in stop_token_ids]
        if not jobs:
            return BackendRound([])
        with ThreadPoolExecutor(max_workers=min(len(jobs), 64)) as pool:
            futures = [pool.submit(self._chunk, i % len(self.urls), smp, n, stops) for i, (smp, n) in enumerate(jobs)]
            return BackendRound([f.result() for f in futures])

    def _model(self, i: int) -> str:
        if self.models[i] is None:  # vLLM checks the name; ours accepts any
            self.models[i] = self.clients[i].models.list().data[0].id
        return self.models[i]

    def _chunk(self, i: int, smp: Sample, n: int, stops: list[int]) -> Chunk:
        try:
            r = self.clients[i].completions.create(
                model=self._model(i), prompt=smp.prompt + smp.tokens, max_tokens=n, temperature=1.0, top_p=1.0,
                seed=smp.generator.initial_seed(), logprobs=0,
                extra_body={"return_token_ids": True, "seed_offset": len(smp.tokens), "stop_token_ids": stops,
                            "ignore_eos": True})
        except self._openai.APIError as e:
            raise ConfigError(f"rollout server {self.urls[i]}: {e}") from None
        choice = r.choices[0]
        ids = (choice.model_extra or {}).get("token_ids")
        lps = choice.logprobs.token_logprobs if choice.logprobs is not None else None
        if ids is None or lps is None or len(ids) != len(lps):
            raise ConfigError(f"rollout server {self.urls[i]} returned no token ids with their log-probs "
                              "(it must implement return_token_ids and logprobs)")
        finish = choice.finish_reason
        # "stop" must end on a stop id and "length" must fill max_tokens; anything else (the server's context, a
        # cancelled request) is a cut-short chunk, which the rollout treats as truncated
        if (finish == "stop" and not (ids and ids[-1] in stops)) or (finish == "length" and len(ids) < n):
            finish = "cut"
        version = (r.model_extra or {}).get("weight_version", self.version)
        return Chunk([int(t) for t in ids], [float(x) for x in lps], finish, version)
