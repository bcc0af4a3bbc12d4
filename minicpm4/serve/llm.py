"""LLM: the text layer over the token-id engine (tokenizer, chat template, stop strings, streaming text).

The engine stops on ids; stop strings are checked here on decoded text, through the engine's per-request
stop_fn hook, and the returned text is cut before the stop string, as the OpenAI API does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from minicpm4.engine.engine import Engine, Generation
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import InputError, MiniCPM4Error
from minicpm4.io.loader import load
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.native_stack import attach
from minicpm4.spec.decoder import build_speculative
from minicpm4.text.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TextResult:
    text: str
    generation: Generation


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class TextStream:
    """Token ids in, text pieces out. The text never includes a stop token or a stop string; text that could
    be the start of a stop string is held back until it is known not to be."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], stop_ids: set[int]):
        self.decoder, self.stop, self.stop_ids = StreamDecoder(tokenizer), list(stop), stop_ids
        self.hold = max((len(s) for s in self.stop), default=0)
        self.text, self.sent, self.found = "", 0, False

    def push(self, token: int) -> str:
        if self.found or token in self.stop_ids:
            return ""
        self.text, self.found = cut_at_stop(self.text + self.decoder.push(token), self.stop)
        safe = len(self.text) if self.found else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return piece

    def finish(self) -> str:
        if not self.found:
            self.text += self.decoder.flush()
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


class LLM:
    def __init__(self, model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, speculative=None,
                 load_options: dict | None = None, **engine_kwargs):
        self.model, self.tokenizer = model, tokenizer
        # prefill chunks end right after the template's reply opening and, when long enough, before its control
        # tokens (<|im_start|>, ...): a conversation's next prompt then reuses all of the one before from the
        # prefix cache (Engine.chunk_ends)
        self.engine = Engine(model, **{"boundary_ids": tokenizer.special_ids, "reply_ids": self.reply_opening(),
                                       **engine_kwargs})
        # a SpeculativeDecoder (batch 1, same stream/generate contract) replaces the engine for generate/stream
        self.speculative = speculative
        # how read_weights loads a checkpoint: as LLM.load loaded this model, else at the model's dtype
        self.load_options = load_options or {"dtype": self.engine.dtype, "config_overrides": None, "int4": False}

    @classmethod
    def load(cls, source=None, dtype="auto", config_overrides: dict | None = None, int4: bool = False,
             draft: str | None = None, frspec: str | None = None, spec: dict | None = None,
             **engine_kwargs) -> "LLM":
        """draft: an EAGLE draft directory or a smaller model (see speculative.build_speculative); frspec: an
        FR-Spec vocabulary file for an EAGLE draft; spec: tree/chain options (topk, num_iter, tree_size, gamma)."""
        options = {"dtype": dtype, "config_overrides": config_overrides, "int4": int4}
        model, tokenizer = load(source, **options)
        model = attach(model)
        speculative = None
        if draft is not None:
            speculative = build_speculative(model, draft, frspec, spec, engine_kwargs.get("max_len"),
                                            engine_kwargs.get("kv_cache_dtype", "auto"))
        return cls(model, tokenizer, speculative, options, **engine_kwargs)

    # ---- weights ----
    def read_weights(self, path: str) -> MiniCPM4ForCausalLM:
        """The checkpoint at `path`, a local model directory or .gguf file (never a Hub id: nothing is downloaded),
        loaded as this LLM's model was (dtype, overrides, int4; fused and the C++ stack attached if it was), for
        swap_weights. Directories are read from safetensors (a pickled pytorch_model.bin is refused). InputError
        naming the path when it is not a loadable checkpoint with this model's config (architecture, vocabulary)."""
        if not Path(path).exists():
            raise InputError(f"model_path: {path}: no such file or directory")
        try:
            model, _ = load(Path(path), **self.load_options)
        except (MiniCPM4Error, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise InputError(f"model_path: {path} is not a loadable checkpoint: {e}") from None
        a, b = self.model.config.to_dict(), model.config.to_dict()
        diff = sorted(k for k in set(a) | set(b) if k != "torch_dtype" and a.get(k) != b.get(k))
        if diff:
            raise InputError(f"model_path: {path} is not a checkpoint of the served model: its config differs in "
                             f"{', '.join(diff)}")
        return attach(model) if self.model.fused else model  # set up as the served model was (attach fuses)

    def swap_weights(self, model: MiniCPM4ForCausalLM) -> None:
        """Serve `model` (from read_weights) from the engine's next step on. The caller makes sure no request is
        running: a request's KV cache rows were written by the old weights."""
        self.model = model.eval()
        self.engine.use_model(model)

    # ---- prompts ----
    def reply_opening(self) -> list[int]:
        """The ids the chat template adds to open the assistant's reply (its generation prompt, e.g.
        `<|im_start|>assistant\n`), or [] when they cannot be told apart (no template, or one whose prompt
        does not extend the same messages without it)."""
        messages = [{"role": "user", "content": "Hi."}]
        try:
            bare = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            full = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except MiniCPM4Error:
            return []
        if not full.startswith(bare) or len(full) == len(bare):
            return []
        return self.tokenizer.encode(full[len(bare):])

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """The chat prompt as ids. BOS is added as the tokenizer config says (MiniCPM4's template omits it and relies
        on the tokenizer), but not a second time when the template already wrote it (Llama-3 style templates)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        bos = self.tokenizer.bos_token_id
        return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    @property
    def stop_token_ids(self) -> list[int]:
        """The model's eos ids and the tokenizer's (template stop tokens like <|im_end|>)."""
        return sorted(set(self.model.config.eos_token_ids) | set(self.tokenizer.eos_token_ids))

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        params = params or SamplingParams()
        if params.stop_token_ids is None:
            params = dataclasses.replace(params, stop_token_ids=self.stop_token_ids)
        return params

    def stop_fn(self, stops: Sequence[str]):
        """The engine's stop_fn for stop strings (checked on the decoded tail of the generated ids)."""
        if not stops:
            return None
        # tokens to decode: a character is at most 4 byte-tokens, so this always covers the longest stop string
        window = 4 * max(len(s) for s in stops) + 8

        def stop_fn(ids: list[int]) -> bool:
            return cut_at_stop(self.tokenizer.decode(ids[-window:]), stops)[1]
        return stop_fn

    # ---- generation ----
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams | None = None,
                     stop: Sequence[str] = ()) -> list[TextResult]:
        params = self._params(params)
        gens = (self.speculative or self.engine).generate(prompts, params, [self.stop_fn(stop)] * len(prompts))
        return [TextResult(self._final_text(g, params, stop), g) for g in gens]

    def generate(self, prompts: str | list[str], params: SamplingParams | None = None,
                 stop: Sequence[str] = ()) -> list[TextResult]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.generate_ids([self.encode_text(p) for p in prompts], params, stop)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, stop: Sequence[str] = ()) -> TextResult:
        return self.generate_ids([self.encode_chat(messages)], params, stop)[0]

    def stream_ids(self, prompt: list[int], params: SamplingParams | None = None, stop: Sequence[str] = (),
                   on_finish: Callable[[Generation], None] | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded (see TextStream); on_finish receives the engine's Generation
        (token ids, timings, finish reason) at the end."""
        params = self._params(params)
        text = self.text_stream(params, stop)
        tokens = (self.speculative or self.engine).stream(prompt, params, self.stop_fn(stop))
        while True:
            try:
                token = next(tokens)
            except StopIteration as end:  # the engine ends right after a stop token or stop string
                generation = end.value
                break
            if piece := text.push(token):
                yield piece
        if piece := text.finish():
            yield piece
        if on_finish is not None:
            on_finish(generation)

    def text_stream(self, params: SamplingParams, stop: Sequence[str] = ()) -> "TextStream":
        return TextStream(self.tokenizer, stop, set(params.stop_token_ids or ()) | set(params.extra_stop_token_ids))

    def _final_text(self, g: Generation, params: SamplingParams, stop: Sequence[str]) -> str:
        ids = g.token_ids
        if g.finish_reason == "stop" and ids and ids[-1] in set(params.stop_token_ids or ()):
            ids = ids[:-1]
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=False), stop)[0]

