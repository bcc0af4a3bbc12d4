"""Cache rows of finished requests, kept as they are so the next turn of a conversation finds its keys in place.

With the prefix cache, a new request copies the cached chunks its prompt starts with into its row
(prefix_cache.load): at a 4K-token document that is ~90 MB of keys and values for the default model, and as many
freshly committed pages, on every turn. llama.cpp's slots keep their tokens instead. Here a finished request's row
is parked: its pages stay, along with which prompt chunks it holds (their ends and tokens). A request admitted to
a parked row whose chunks its own prompt starts with (same tokens, same chunk ends: the chunking is a function of
the tokens, Engine.chunk_ends) uses them where they lie, bit for bit what it would have computed, and loads from
the prefix cache only what follows. Keys past those chunks (the old reply, stale) are overwritten by the new
prefill before anything reads them, and InfLLM v2's compressed keys are cut back by those writes (sparse/cache.py).

A parked row's tokens count against the KV budget; the least recently parked rows are given back to the OS
(KVCache.release_row) when a request needs the room or its slot holds nothing the request can use.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Parked:
    prompt: list[int]
    ends: list[int]  # ends of the prompt's chunks the row holds
    written: int  # slots [0, written) may hold this request's data

    def chunks_in_place(self, prompt: list[int], ends: list[int]) -> int:
        """How many of a new prompt's first chunks (never its last: it gives the first token's logits) lie here."""
        n = 0
        for a, b in zip(self.ends, ends[:-1]):
            if a != b:
                break
            n += 1
        while n and self.prompt[:ends[n - 1]] != prompt[:ends[n - 1]]:
            n -= 1
        return n


class ParkedRows:
    def __init__(self):
        self.rows: OrderedDict[int, Parked] = OrderedDict()  # by slot, least recently parked first

    def __len__(self) -> int:
        return len(self.rows)

    def park(self, slot: int, prompt: list[int], ends: list[int], written: int) -> None:
        self.rows[slot] = Parked(prompt, ends, written)

    def written(self, slot: int) -> int:
        p = self.rows.get(slot)
        return p.written if p is not None else 0

    def pick(self, free: list[int], prompt: list[int], ends: list[int]) -> tuple[int, int]:
        """(slot, chunks in place) for a new prompt among the free slots: the parked row holding most of its first
        chunks; else the lowest slot parking nothing; else the least recently parked row."""
        best = max(((p.chunks_in_place(prompt, ends), -slot) for slot, p in self.rows.items() if slot in free),
                   default=(0, 0))
        if best[0]:
            return -best[1], best[0]
        empty = [s for s in free if s not in self.rows]
        if empty:
            return empty[0], 0
        return next(s for s in self.rows if s in free), 0

    def pop(self, slot: int) -> Parked | None:
        return self.rows.pop(slot, None)

    def oldest(self, besides: int) -> int | None:
        return next((s for s in self.rows if s != besides), None)
