"""Run a synthesis track over seed documents: bounded concurrency, resumable output, a report.

`synthesize` streams seeds through as many worker coroutines as the client's concurrency (each works on
one seed at a time; the client's semaphore bounds requests, tracks that fan out included); each finished seed is stored at once (synth_store.py),
so an interrupted run resumes where it stopped. A seed that fails for good (SynthesisError: endpoint
down, retries exhausted) is not marked done and is counted, so the next run retries it; the run itself
carries on. Seeds are read with the same parser as the filter (records.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Iterable

from minicpm4.data.synth_client import ChatClient, ClientSettings, SynthesisError
from minicpm4.data.synth_store import SampleStore
from minicpm4.data.synth_tracks import TRACK_FUNCTIONS, TrackContext
from minicpm4.errors import ConfigError


def read_seeds(paths: list[str], text_key: str = "text", limit: int = 0) -> list[tuple[str, str]]:
    """(seed id, text) for every usable record of the seed files; ids are the record's id or path:line."""
    from minicpm4.data.pipeline import list_inputs  # datatrove-backed readers: seeds only
    from minicpm4.data.records import open_records

    seeds = []
    for path in list_inputs(paths):
        for rec in open_records(path, text_key):
            if rec.reason is None:
                seeds.append((str(rec.meta.get("id", rec.where)), rec.text))
                if limit and len(seeds) >= limit:
                    return seeds
    if not seeds:
        raise ConfigError(f"seeds {paths}: no usable documents (text field '{text_key}')")
    return seeds


async def synthesize(track: str, seeds: Iterable[tuple[str, str]], out: str, settings: ClientSettings,
                     context: dict | None = None, log=None) -> dict:
    if track not in TRACK_FUNCTIONS:
        raise ConfigError(f"track {track!r}: choose one of {sorted(TRACK_FUNCTIONS)}")
    seeds = list(seeds)
    ctx_args = dict(context or {})
    if track == "tool_use" and not ctx_args.get("tools"):
        raise ConfigError("track tool_use needs tools (--tools FILE)")
    client = ChatClient(settings, seed=ctx_args.get("seed", 0))
    ctx = TrackContext(client=client, pool=seeds if track == "long_context" else [], **ctx_args)
    store = SampleStore(out)
    report = Counter(seeds=len(seeds), already_done=sum(sid in store.done for sid, _ in seeds))
    rejected = Counter()
    queue: asyncio.Queue = asyncio.Queue()
    for item in seeds:
        if item[0] not in store.done:
            queue.put_nowait(item)
    fn = TRACK_FUNCTIONS[track]

    async def worker():
        while True:
            try:
                seed_id, text = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                samples, reasons = await fn(ctx, seed_id, text)
            except SynthesisError as e:
                report["failed_seeds"] += 1
                if log:
                    log(f"seed {seed_id}: {e}")
                continue
            rejected.update(reasons)
            report["samples"] += store.add_seed(seed_id, samples)
            report["processed"] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, settings.concurrency))))
    finally:
        store.close()
        await client.close()
    return {**report, "duplicates": store.duplicates, "dropped_partial": store.dropped_partial,
            "rejected": dict(rejected), "client": dict(client.stats)}


def run_synthesis(track: str, seed_paths: list[str], out: str, settings: ClientSettings, text_key: str = "text",
                  limit: int = 0, context: dict | None = None, log=None) -> dict:
    return asyncio.run(synthesize(track, read_seeds(seed_paths, text_key, limit), out, settings, context, log))
