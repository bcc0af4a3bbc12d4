"""OpenAI API request bodies (the fields we honour, with their ranges) and OpenAI-style error bodies.

Unknown fields are ignored, as OpenAI does; a known field of the wrong type or out of range is a 400 that
names it. OpenAI fields this server does not implement (UNSUPPORTED) are a 400 when set to anything but their
neutral value, never silently ignored. Text that is not valid Unicode (a lone surrogate such as "\ud800", which
JSON can spell but UTF-8 cannot) is a 400 naming the field; it is not replaced. Sampling fields map onto
SamplingParams in `sampling_params`; `replayed_generator` serves seed_offset.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from minicpm4.engine.sampling import MAX_SEED, SamplingParams, sample_token
from minicpm4.text.tokenizer import invalid_unicode

# field -> the values that mean "off"; any other is refused, as the server would otherwise ignore it (best_of
# equal to n also means off: every candidate is returned)
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "frequency_penalty": (None, 0),
               "presence_penalty": (None, 0), "response_format": (None, {"type": "text"}), "functions": (None, []),
               "function_call": (None, "none")}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _bad_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """(path, why) of the first string (or key) in a JSON value that is not valid Unicode, else None."""
    if isinstance(value, str):
        why = invalid_unicode(value)
        return (path, why) if why else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = str(key).encode("utf-8", "backslashreplace").decode()  # error texts must be encodable themselves
        sub = f"{path}.{name}" if path else name
        found = _bad_text(key, sub) if isinstance(key, str) else None
        found = found or _bad_text(item, sub)
        if found:
            return found
    return None


class FunctionSpec(_Base):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionSpec


class ContentPart(_Base):
    type: Literal["text"]  # images and audio would be dropped unseen: refused instead
    text: str | None = None


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict:
        """A plain dict for the chat template; text parts of a content list are joined."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content if p.type == "text")
        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # extensions, as vLLM and llama.cpp accept them
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: also stop on these ids (kept as the last generated id)
    ignore_eos: bool = False  # vLLM's: do not stop on the model's eos ids (stop_token_ids still stop)

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data):
        """Before field parsing: the whole body must be valid Unicode, and unsupported fields neutral."""
        bad = _bad_text(data)
        if bad:
            raise PydanticCustomError("unicode", "not valid Unicode ({why})", {"param": bad[0], "why": bad[1]})
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if name in data and data[name] not in neutral and not (name == "best_of" and
                                                                       data[name] == data.get("n", 1)):
                    raise PydanticCustomError("unsupported", "not supported by this server (got {value}; "
                                              "leave it out)", {"param": name, "value": json.dumps(data[name])})
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    # for trainers (RL rollout): vLLM's name; each choice gets prompt_token_ids and token_ids (every generated id,
    # a final stop token included, aligned with logprobs.token_logprobs), so nothing is re-tokenized
    return_token_ids: bool = False
    # ours: tokens already sampled from `seed` (earlier chunks of one sample); the choice draws what it would have
    # drawn next had one request sampled them all (replayed_generator)
    seed_offset: int = Field(default=0, ge=0)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """Token ids are JSON integers: not booleans, floats or digit strings, which pydantic would coerce."""
        ids = lambda x: isinstance(x, list) and all(type(t) is int for t in x)  # noqa: E731
        if isinstance(v, str) or ids(v) or (isinstance(v, list) and all(isinstance(x, str) or ids(x) for x in v)):
            return v
        raise ValueError("must be a string, a list of token ids (integers), or a list holding one of those")

    @model_validator(mode="after")
    def _offset(self):
        if self.seed_offset and self.seed is None:
            raise PydanticCustomError("seed_offset", "seed_offset needs a seed", {"param": "seed_offset"})
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


def sampling_params(body: _Sampling, max_new_tokens: int, stop_token_ids: list[int], index: int) -> SamplingParams:
    """The n-th choice's SamplingParams; with a seed, choice i uses seed + i (wrapping past MAX_SEED) so the n
    choices differ."""
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                          seed=None if body.seed is None else (body.seed + index) % (MAX_SEED + 1), stop_token_ids=stop_token_ids,
                          ignore_eos=body.ignore_eos, extra_stop_token_ids=list(body.stop_token_ids or ()),
                          logprobs=body.logprobs_k)


def replayed_generator(params: SamplingParams, draws: int, vocab_size: int) -> torch.Generator:
    """A generator seeded with params.seed that has made the draws of `draws` sampled tokens. sample_token draws the
    same amount whatever the logits (greedy: none; else torch.multinomial of one sample, which is Gumbel-max: one
    exponential per vocabulary entry), so replaying it on zero logits leaves the stream exactly where a request
    that sampled those tokens left it. Cost: `draws` samplings over the vocabulary, no forward pass."""
    gen = torch.Generator().manual_seed(params.seed)
    logits, seen = torch.zeros(vocab_size), torch.empty(0, dtype=torch.long)
    for _ in range(draws):
        sample_token(logits, params, seen, gen)
    return gen


class ReloadWeightsRequest(_Base):
    """POST /update_weights_from_disk: SGLang's endpoint and field names (SGLang's weight_version is any string;
    ours is an integer, as rollout chunks are tagged with policy versions). Other SGLang fields are ignored: a
    reload here always drains running requests (serve/reload.py)."""
    model_path: str = Field(min_length=1)  # a local model directory (or .gguf file) of the served architecture
    weight_version: int | None = Field(default=None, ge=0)  # the version reported from now on (a trainer's step);
    # default: the current version + 1
