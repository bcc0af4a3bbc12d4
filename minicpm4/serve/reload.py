"""Swapping the served weights while the server runs: POST /update_weights_from_disk (SGLang's endpoint and body,
{"model_path": DIR}), for trainers whose rollouts run on this server (train/rl/remote.py).

Order of a reload:
1. the new checkpoint is read and checked (LLM.read_weights, on a worker thread) while the old weights keep serving
   (so memory holds both models until the swap); a bad path or another architecture is a 400 and changes nothing;
2. admission closes: new requests wait (they are not refused);
3. the running and queued requests finish on the old weights (drained, never aborted, so every response comes
   from one set of weights; a reload therefore waits for the longest running request, at most max_tokens);
4. the engine's model is swapped between engine steps (the engine thread is idle: nothing is running), the version
   counter moves on, and admission reopens.
Every completion reports the `weight_version` it was generated with (0 = the weights the server started with).
One reload runs at a time; a second waits for the first.

Who may reload: the holder of the admin key (serve --admin-key, else --api-key). A server started with neither
refuses every reload (403): an open server must not let anyone replace its model.
"""

from __future__ import annotations

import asyncio

from minicpm4.serve.llm import LLM


class WeightReloader:
    def __init__(self, llm: LLM, engine):
        self.llm, self.engine = llm, engine  # engine: the AsyncEngine running llm.engine
        self.version = 0
        self._open = asyncio.Event()
        self._open.set()
        self._one = asyncio.Lock()

    async def admitted(self) -> int:
        """Wait while a swap is under way; returns the weights version a request submitted now runs on (submit it
        before the next await)."""
        await self._open.wait()
        return self.version

    async def reload(self, path: str, version: int | None = None) -> int:
        """Serve the checkpoint at `path` from now on; returns the new version (`version`, else the old + 1).
        InputError (old weights kept) when it is not a checkpoint of the served model."""
        async with self._one:
            model = await asyncio.to_thread(self.llm.read_weights, path)
            self._open.clear()
            try:
                while self.engine.running or self.engine.queued:  # submitted and not finished
                    await asyncio.sleep(0.01)
                self.llm.swap_weights(model)
                self.version = self.version + 1 if version is None else version
            finally:
                self._open.set()
            return self.version
