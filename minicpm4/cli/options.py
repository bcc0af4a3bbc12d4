"""Options and helpers the command modules share: model and sampling flags, JSON-valued flags, loading an LLM."""

from __future__ import annotations

import json
import time

import click

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
        click.option("--dtype", default="auto", show_default=True,
                     help="bf16 or fp32. auto: bf16 where the CPU has bf16 dot products (avx512_bf16 / AMX / Arm "
                          "BF16) or the weights stay int4, else fp32 (printed at load)."),
        click.option("--int4/--no-int4", default=None,
                     help="Keep a GGUF's Q4_1 layer weights 4-bit (int4 kernel) and the head int8: faster decode on "
                          "CPU. Default: on for the default model unless --dtype is given (as llama.cpp runs its "
                          "GGUF), off otherwise."),
        click.option("--sparse/--no-sparse", default=None,
                     help="InfLLM v2 sparse attention on/off (default: on when config.json has a sparse_config)."),
        click.option("--sparse-config", default=None,
                     help='JSON of sparse_config fields, e.g. \'{"dense_len": 1024, "topk": 32}\' (implies --sparse).'),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def prefix_cache_options(f):
    """The engine's prefix cache (serve, chat): on by default, it is exact (engine/prefix_cache.py)."""
    opts = [
        click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
                     help="Keep the keys and values of prompts' prefill chunks and reuse them for later prompts "
                          "that start with the same chunks (chat turns, agent steps, shared documents); exact."),
        click.option("--prefix-cache-gb", default=1.0, show_default=True, type=click.FloatRange(min=0),
                     help="Memory for the prefix cache's blocks; least recently used blocks are dropped past it."),
        click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(min=1),
                     help="Prompt tokens per prefill forward at most (a chunk also ends before a chat template's "
                          "control token); the chunks are the prefix cache's blocks."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def kv_cache_option(f):
    """The KV cache's storage (generate, chat, serve): the engine's Engine(kv_cache_dtype=...)."""
    return click.option("--kv-cache-dtype", type=click.Choice(["auto", "int8"]), default="auto", show_default=True,
                        help="KV cache storage. auto: the model's dtype; int8: int8 keys and values with one fp32 "
                             "scale per token and KV head (round to nearest, scale = max|x| / 127, as llama.cpp's "
                             "q8_0 cache): 0.53x the cache bytes at head_dim 64, read in place by the C++ "
                             "attention kernels; slightly less exact (BENCHMARKS.md, int8 KV cache).")(f)


def context_options(f):
    """Context length and KV-cache memory (serve, chat): the cache's pages are committed as tokens are written."""
    opts = [
        click.option("--max-model-len", default=None, type=click.IntRange(min=2),
                     help="Context per request, prompt + reply (default: the model's max_position_embeddings). "
                          "Memory follows what requests write, not this length; a longer prompt is refused "
                          "(serve: a 400)."),
        click.option("--kv-cache-gb", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Memory the keys and values of running requests (and of rows kept for a next turn) "
                          "may take; each request reserves prompt + max_tokens, and requests beyond it wait "
                          "(default: 80% of the memory available at start)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def draft_options(f):
    """Speculative decoding (generate, chat): batch 1, through minicpm4.spec.decoder."""
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


def json_object(text: str, option: str) -> dict:
    """The JSON object given to `option`, or a usage error naming it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value


def sampling_params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed):
    from minicpm4.engine.sampling import SamplingParams
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)


def config_overrides(sparse, sparse_config) -> dict | None:
    """config.json overrides from the sparse flags (shipped MiniCPM4 configs omit sparse_config)."""
    fields = {} if sparse_config is None else json_object(sparse_config, "--sparse-config")
    if sparse is False:
        return {"sparse_config": None}
    return {"sparse_config": fields} if sparse or sparse_config is not None else None


def describe(model) -> str:
    """The loaded weights and activations and the kernel tier, e.g. "int4 weights, bf16 activations, kernels
    avx512_bf16": what --dtype auto / --int4 chose on this CPU, printed once at load."""
    from minicpm4 import kernels
    from minicpm4.quant.int4 import Int4Linear
    from minicpm4.quant.int8 import Int8Linear
    from minicpm4.quant.ternary import TernaryLinear
    kinds = {name for m in model.modules() for t, name in ((Int4Linear, "int4"), (Int8Linear, "int8"),
                                                            (TernaryLinear, "ternary")) if isinstance(m, t)}
    act = str(next(model.parameters()).dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    weights = "+".join(sorted(kinds)) + f" weights (other tensors {act})" if kinds else f"{act} weights"
    tier = kernels.isa.selected() if kernels.native() is not None else None
    return f"{weights}, {act} activations, kernels {tier or 'none (PyTorch paths)'}"


def load_llm(model_path, dtype, int4=None, sparse=None, sparse_config=None, draft=None, frspec=None, spec_json=None,
          **engine_kwargs):
    from minicpm4.serve.llm import LLM
    if int4 is None:  # the default model is a Q4_1 GGUF: keep its weights 4-bit unless a dtype was asked for
        int4 = model_path in (None, "default") and dtype == "auto"
    overrides = config_overrides(sparse, sparse_config)
    spec = None if spec_json is None else json_object(spec_json, "--spec")
    t0 = time.perf_counter()
    llm = LLM.load(model_path, dtype=dtype, config_overrides=overrides, int4=int4, draft=draft, frspec=frspec,
                   spec=spec, **engine_kwargs)
    click.echo(f"[loaded {model_path or 'default model'} in {time.perf_counter() - t0:.1f}s: {describe(llm.model)}]",
               err=True)
    return llm
