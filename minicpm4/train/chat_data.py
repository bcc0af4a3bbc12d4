"""SFT data: chat JSONL (OpenAI messages, tool calls included) -> packed rows with loss on assistant tokens only.

Each line is {"messages": [...], "tools": [...] (optional)}. Tool calls and tool results are written into plain
turns by minicpm4.text.tool_calls.render_messages (the format the server uses at inference), then the tokenizer's chat
template renders the conversation. An assistant turn is the text between the prompt rendered up to it with the
generation prompt and the prompt rendered including it: its content and the template's end-of-turn tokens,
never the `<|im_start|>assistant` header. Tokens whose first character lies in such a span are targets.

Rows of seq_len tokens are packed greedily from the epoch's shuffled conversations (one that would overflow the
row starts the next); `segments` numbers the conversations of a row, so the model attends within a
conversation only and restarts positions (MiniCPM4ForCausalLM.forward(segments=)). Padding is its own segment
and carries no loss. State and rank split work as in token_loader.PackedLoader, with rows in place of windows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minicpm4.errors import ConfigError, InputError
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.text.tool_calls import render_messages
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.shard_writer import jsonl_rows
from minicpm4.train.token_loader import check_data_state


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                        fmt: str = "json") -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, per token: does it belong to an assistant turn)."""
    plain = render_messages(messages, tools, None, fmt)
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(plain):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InputError("a conversation cannot open with an assistant turn")
        start = len(tokenizer.apply_chat_template(plain[:i], add_generation_prompt=True))
        end = tokenizer.apply_chat_template(plain[:i + 1], add_generation_prompt=False)
        if not text.startswith(end) or start > len(end):
            raise InputError("the chat template does not render conversations prefix by prefix, so assistant "
                             "turns cannot be located")
        spans.append((start, len(end)))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    assistant = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    bos = tokenizer.bos_token_id
    if tokenizer.config.get("add_bos_token") and bos is not None and ids[:1] != [bos]:
        ids, assistant = [bos, *ids], [False, *assistant]
    return ids, assistant


def example_tensors(ids: list[int], assistant: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [n], labels [n]): position t predicts token t+1, a target only when that token is assistant's."""
    x = torch.tensor(ids)
    labels = torch.full_like(x, IGNORE)
    mask = torch.tensor(assistant[1:], dtype=torch.bool)
    labels[:-1][mask] = x[1:][mask]
    return x, labels


def read_chat_jsonl(path: str | Path, tokenizer: Tokenizer, seq_len: int, fmt: str = "json"):
    """Encoded conversations [(ids, labels)], truncated to seq_len; those with no target left are dropped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: chat JSONL file not found")
    examples = []
    for n, row in jsonl_rows(path):
        try:
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise InputError('each line must be an object with a "messages" list')
            ids, assistant = encode_conversation(tokenizer, row["messages"], row.get("tools"), fmt)
        except InputError as e:
            raise InputError(f"{path}:{n}: {e}") from None
        x, labels = example_tensors(ids[:seq_len], assistant[:seq_len])
        if (labels != IGNORE).any():
            examples.append((x, labels))
    if not examples:
        raise ConfigError(f"{path}: no conversation with an assistant turn within seq_len {seq_len}")
    return examples


class ChatLoader:
    """Packed SFT batches: next_batch() -> {"input_ids", "labels", "segments"} [batch_size/world, seq_len]."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, fmt: str = "json"):
        self.examples = read_chat_jsonl(path, tokenizer, seq_len, fmt)
        self.seq_len, self.batch_size, self.seed, self.rank, self.world = seq_len, batch_size, seed, rank, world
        eos = tokenizer.eos_token_id
        self.pad_id = eos if eos is not None else 0
        self.epoch, self.position = 0, 0
        self._rows: list[list[int]] | None = None

    def epoch_rows(self) -> list[list[int]]:
        """The epoch's rows as lists of example indices, packed in the epoch's shuffled order."""
        if self._rows is None:
            order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            rows, row, used = [], [], 0
            for i in order.tolist():
                n = len(self.examples[i][0])
                if used + n > self.seq_len:
                    rows.append(row)
                    row, used = [], 0
                row.append(i)
                used += n
            self._rows = rows + [row]
        return self._rows

    def next_rows(self) -> list[list[int]]:
        picked: list[list[int]] = []
        while len(picked) < self.batch_size:
            rows = self.epoch_rows()
            take = min(self.batch_size - len(picked), len(rows) - self.position)
            picked += rows[self.position:self.position + take]
            self.position += take
            if self.position == len(rows):
                self.epoch, self.position, self._rows = self.epoch + 1, 0, None
        return picked

    def pack(self, row: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((self.seq_len,), self.pad_id)
        labels = torch.full((self.seq_len,), IGNORE)
        segments = torch.full((self.seq_len,), len(row))  # padding: a segment of its own
        at = 0
        for s, i in enumerate(row):
            x, y = self.examples[i]
            ids[at:at + len(x)], labels[at:at + len(x)], segments[at:at + len(x)] = x, y, s
            at += len(x)
        return ids, labels, segments

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = self.next_rows()
        local = self.batch_size // self.world
        packed = [self.pack(r) for r in rows[self.rank * local:(self.rank + 1) * local]]
        return {k: torch.stack([p[j] for p in packed]) for j, k in enumerate(("input_ids", "labels", "segments"))}

    def state_dict(self) -> dict:
        return {"kind": "sft", "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        check_data_state(state, self.state_dict(), ("kind", "seed", "seq_len", "examples"))
        self.epoch, self.position, self._rows = int(state["epoch"]), int(state["position"]), None
