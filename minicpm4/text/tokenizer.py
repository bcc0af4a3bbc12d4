"""Text <-> token ids, chat templates and streaming detokenization on top of `tokenizers`.

`Tokenizer` pairs a `tokenizers.Tokenizer` backend (what tokenizer.json holds) with a
tokenizer_config.json-style dict (special token strings, `add_bos_token`, `chat_template`); it loads
from a HF directory or a GGUF checkpoint and saves back as a HF directory.

Key choices:
- Backends built from GGUF vocabularies mirror transformers' GGUF conversion, so ids match it:
  byte-level BPE for 'gpt2', SentencePiece-style BPE with byte fallback for 'llama' (merges rebuilt
  from scores). One deliberate difference: `add_space_prefix = false` means no "▁" prefix, as in
  llama.cpp (transformers ignores that flag).
- BOS comes from `add_bos_token` unless the backend's post-processor already adds it, never twice.
- Chat templates render in a sandboxed jinja2 environment set up as transformers sets it up
  (trim_blocks, lstrip_blocks, `raise_exception`, non-escaping `tojson`), so prompts match exactly.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext  # also binds `jinja2`
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

from minicpm4.errors import CheckpointError, InputError
from minicpm4.fileio import atomic_write_text

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_CHAT_TEMPLATE = (  # ChatML, for checkpoints that ship no template
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)
# Llama-3's pre-tokenizer split, for `tokenizer.ggml.pre` in _LLAMA3_PRE. Every other value (gpt2, smollm,
# ...) uses the GPT-2 regex built into ByteLevel, as transformers does. (llama.cpp also splits digits one
# by one for 'smollm'; SmolLM's vocab has no multi-digit tokens, so its ids are the same.)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")


def invalid_unicode(text: str) -> str | None:
    """Why `text` is not Unicode text, or None. A lone surrogate ("\ud800" in JSON) is a Python str that no
    encoding can write, and the tokenizers backend refuses it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate {text[e.start]!r} at character {e.start}"
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its tokenizer_config: encode/decode, chat template, save/load."""

    def __init__(self, backend: Backend, config: dict[str, Any] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        for key in SPECIAL_TOKEN_KEYS:  # HF configs may spell these as {"content": "<s>", ...}
            value = self.config.get(key)
            self.config[key] = value.get("content") if isinstance(value, dict) else value
        self.bos_token_id = self._token_id(self.config["bos_token"])
        self.eos_token_id = self._token_id(self.config["eos_token"])
        # An empty input shows whether the backend's post-processor adds BOS/EOS by itself.
        self._backend_adds_specials = bool(backend.encode("", add_special_tokens=True).ids)
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json (or convert tokenizer.model) and tokenizer_config.json from a HF directory."""
        path = Path(directory)
        config = _read_json(path / "tokenizer_config.json")
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)
        if (path / "chat_template.jinja").is_file():  # transformers 5 keeps the template here
            config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            config["chat_template"] = _read_json(path / "chat_template.json").get("chat_template")
        if (path / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # the Rust side raises plain Exception
                raise CheckpointError(f"{path / 'tokenizer.json'}: cannot be parsed ({exc})") from None
        elif (path / "tokenizer.model").is_file():
            backend = _convert_sentencepiece_model(path / "tokenizer.model", config)
        else:
            raise CheckpointError(f"{path}: has neither tokenizer.json nor tokenizer.model")
        return cls(backend, config)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json (each atomically) into `directory`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        atomic_write_text(path / "tokenizer.json", self.backend.to_str(pretty=False))
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's own template (None when it has none and ChatML is used)."""
        return self.config.get("chat_template")

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: EOS, plus `<|im_end|>` when the chat template is ChatML."""
        im_end = self._token_id("<|im_end|>") if "<|im_end|>" in (self.chat_template or DEFAULT_CHAT_TEMPLATE) else None
        return list(dict.fromkeys(i for i in (self.eos_token_id, im_end) if i is not None))

    @property
    def special_ids(self) -> list[int]:
        """Ids of the special (control) tokens: bos/eos and a chat template's markers such as <|im_start|>."""
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`; special tokens written in the text (e.g. `<|im_start|>`) stay whole."""
        bad = invalid_unicode(text)
        if bad:
            raise InputError(f"text is not valid Unicode: {bad}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and not self._backend_adds_specials:
            if self.config.get("add_bos_token") and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.config.get("add_eos_token") and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt string for `messages`, rendered with the checkpoint's own template (ChatML if none)."""
        source = self.chat_template or DEFAULT_CHAT_TEMPLATE
        if source not in self._compiled:
            try:
                self._compiled[source] = _jinja_environment().from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise CheckpointError(f"chat template does not parse: {exc}") from None
        specials = {key: self.config[key] for key in SPECIAL_TOKEN_KEYS if self.config[key] is not None}
        # As transformers does: keys set to None are dropped, so templates test presence with `in`.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            return self._compiled[source].render(messages=messages, tools=tools,
                                                 add_generation_prompt=add_generation_prompt, **{**specials, **kwargs})
        except jinja2.TemplateError as exc:  # includes the template's own raise_exception(...)
            raise InputError(f"chat template rejected the conversation: {exc}") from None

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


class StreamDecoder:
    """Incremental detokenizer: `push` one id at a time, get back only the newly completed text.

    Decoding one token alone is wrong: a character's UTF-8 bytes may span tokens, and SentencePiece
    decoders strip the string's leading space. So pending tokens are decoded after the previous chunk
    (context), the text past the context's is emitted, and it is held back while it ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []  # context tokens (already emitted) followed by pending ones
        self._n_context = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        context = self._tokenizer.decode(self._ids[: self._n_context], self._skip_special)
        text = self._tokenizer.decode(self._ids, self._skip_special)
        if not final and (text.endswith("\ufffd") or len(text) <= len(context)):
            return ""
        self._ids = self._ids[self._n_context:]  # the tokens just emitted become the next context
        self._n_context = len(self._ids)
        return text[len(context):]


def byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Backend:
    """GPT-2 style byte-level BPE. Tokens are spelled in the bytes_to_unicode alphabet; the few that are
    not (llama.cpp writes some added tokens as plain text) are respelled into it."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3_PRE)
    if pre in _LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, backend.pre_tokenizer])
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_bpe(tokens: list[str], scores: list[float], merges: list[str] | None,
                      add_prefix_space: bool = True) -> Backend:
    """SentencePiece BPE ("▁" for spaces, <0xNN> byte fallback). Without stored merges, they are rebuilt:
    every split of a token into two vocabulary pieces, best token score first."""
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = ([tuple(merge.split(" ", 1)) for merge in merges] if merges is not None
             else _merges_from_scores(vocab, dict(zip(tokens, scores))))
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_prefix_space else steps)
    return backend


def add_vocab_special_tokens(backend: Backend, tokens: list[str], types: list[int],
                             specials: list[str | None]) -> None:
    """Control tokens and the named bos/eos/unk/pad become special, user-defined ones (`<think>`) plain added
    tokens: both then match whole in text. Only tokens already in the vocabulary, so it never grows."""
    present = backend.get_vocab()
    control = [token for token, kind in zip(tokens, types) if kind == _CONTROL]
    special = [token for token in dict.fromkeys(control + [s for s in specials if s]) if token in present]
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    user = [token for token, kind in zip(tokens, types) if kind == _USER_DEFINED and token in present]
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in user])


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    # For each token, its two-piece splits in vocab (ordered by piece ids); then all of them by the
    # token's score, ties by piece lengths, highest first (a stable sort, as transformers' generate_merges).
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _convert_sentencepiece_model(path: Path, config: dict[str, Any]) -> Backend:
    """Backend from a SentencePiece tokenizer.model (BPE), built the same way as from GGUF metadata."""
    try:
        import sentencepiece
    except ImportError:
        raise CheckpointError(f"{path}: converting a SentencePiece tokenizer.model needs the 'sentencepiece' "
                              "package (pip install sentencepiece); or provide tokenizer.json") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({exc})") from None
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [_CONTROL if sp.is_control(i) else 1 for i in range(n)]
    for key, token_id in zip(SPECIAL_TOKEN_KEYS, (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())):
        if token_id >= 0:
            config.setdefault(key, tokens[token_id])
    config.setdefault("add_bos_token", True)
    backend = sentencepiece_bpe(tokens, [sp.get_score(i) for i in range(n)], None)
    add_vocab_special_tokens(backend, tokens, types, [config.get(key) for key in SPECIAL_TOKEN_KEYS])
    return backend


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` only marks assistant text for training masks: render the body."""
    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    # jinja's own tojson HTML-escapes; chat templates expect plain json.dumps (keeping its options).
    env.filters["tojson"] = lambda value, ensure_ascii=False, **options: json.dumps(
        value, ensure_ascii=ensure_ascii, **options)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc})") from None

