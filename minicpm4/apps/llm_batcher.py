"""A `complete` function for many concurrent agent loops over one LLM: their model turns share decode batches.

Each call queues its rendered messages; one consumer task takes what is queued (up to `max_batch`, after a short
wait for the other loops to reach their model turn) and generates it as one batch in a worker thread, so the
event loop (MCP tool calls) keeps running meanwhile. Greedy decoding gives each prompt the same tokens whether
it is batched or alone, up to floating-point reassociation in batched matmuls.
"""

from __future__ import annotations

import asyncio


class BatchedComplete:
    """async (messages) -> the model's reply text; use inside a running event loop, close() at the end."""

    def __init__(self, llm, max_tokens: int = 64, temperature: float = 0.0, max_batch: int = 8,
                 gather_s: float = 0.05):
        from minicpm4.engine.sampling import SamplingParams
        self.llm, self.max_batch, self.gather_s = llm, max_batch, gather_s
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def __call__(self, messages: list[dict]) -> str:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.gather_s
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(timeout, 0)))
                except asyncio.TimeoutError:
                    break
            try:
                prompts = [self.llm.encode_chat(m) for m, _ in batch]
                results = await asyncio.to_thread(self.llm.generate_ids, prompts, self.params)
            except Exception as e:  # every waiting caller sees the failure
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result.text)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
