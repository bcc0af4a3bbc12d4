"""`minicpm4 serve` (OpenAI-compatible server) and `minicpm4 agent` (tool use over MCP): the serve extra's
commands, registered on the root group by `register`."""

from __future__ import annotations

import os

import click

from minicpm4.cli.options import (MODEL_HELP, context_options, kv_cache_option, load_llm, model_options,
                                   prefix_cache_options)


@click.command()
@model_options
@prefix_cache_options
@kv_cache_option
@context_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", envvar="MINICPM4_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 routes (or set MINICPM4_API_KEY).")
@click.option("--admin-key", envvar="MINICPM4_ADMIN_KEY", default=None,
              help="Key for POST /update_weights_from_disk (default: --api-key; with neither, reloads are refused).")
@click.option("--served-model-name", default=None, help="Model id in the API (default: the model's file name).")
@click.option("--max-batch", default=16, show_default=True, help="Requests decoded together at most.")
@click.option("--max-queue", default=64, show_default=True, help="Requests waiting at most (then 429).")
@click.option("--max-tokens", default=4096, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--mcp", "mcp_commands", multiple=True,
              help='MCP server command, e.g. "python my_server.py" (repeatable): chat requests without tools of '
                   "their own get these servers' tools, called by the server.")
@click.option("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), show_default="cores - 1",
              help="Compute threads; one core is left to the HTTP side, whose work would stall the others.")
def serve(model_path, dtype, int4, sparse, sparse_config, prefix_cache, prefix_cache_gb, prefill_chunk, kv_cache_dtype,
          max_model_len, kv_cache_gb, host, port, api_key, admin_key, served_model_name, max_batch, max_queue,
          max_tokens, mcp_commands, threads):
    """OpenAI-compatible server (needs the serve extra: pip install 'minicpm4[serve]')."""
    try:
        from minicpm4.serve.server import serve as run
    except ImportError as e:
        raise click.ClickException(f"{e}; install the serve extra: pip install 'minicpm4[serve]'") from None
    from pathlib import Path

    import torch
    torch.set_num_threads(threads)
    llm = load_llm(model_path, dtype, int4, sparse, sparse_config, max_len=max_model_len, max_slots=max_batch,
                   prefix_cache_gb=prefix_cache_gb if prefix_cache else 0.0, prefill_chunk=prefill_chunk,
                   kv_cache_dtype=kv_cache_dtype, kv_cache_gb=kv_cache_gb)
    name = served_model_name or (Path(model_path).name if model_path else "SmolLM2-135M-Instruct")
    run(llm, name, host=host, port=port, api_key=api_key, admin_key=admin_key, max_queue=max_queue,
        max_tokens=max_tokens, mcp_commands=list(mcp_commands))


@click.command()
@click.option("--prompt", required=True, help="The user message.")
@click.option("--mcp", "mcp_commands", multiple=True, required=True,
              help='MCP server command, e.g. "python my_server.py --flag" (repeatable); only their tools run.')
@click.option("--system", default=None, help="System message.")
@click.option("--max-turns", default=8, show_default=True, help="Model turns at most.")
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--call-timeout", default=60.0, show_default=True, help="Seconds one tool call may take.")
@click.option("--max-output-chars", default=20_000, show_default=True,
              help="Longest tool result passed to the model (longer ones are cut, saying so).")
@click.option("--yes", is_flag=True, help="Run tools the servers mark destructive without asking.")
@prefix_cache_options
def agent(prompt, mcp_commands, system, max_turns, max_new_tokens, temperature, model_path, dtype, call_timeout,
          max_output_chars, yes, prefix_cache, prefix_cache_gb, prefill_chunk):
    """Answer PROMPT with tools from MCP servers (stdio), printing each call and result (serve extra).

    Tools a server marks destructive (e.g. deleting a file) are confirmed on the terminal first, or declined
    when there is no terminal; --yes runs them without asking."""
    from minicpm4.serve.agent import agent_main, ask_on_terminal
    agent_main(model_path, list(mcp_commands), prompt, max_tokens=max_new_tokens, temperature=temperature,
               max_turns=max_turns, dtype=dtype, system=system, call_timeout=call_timeout,
               max_output_chars=max_output_chars, confirm=None if yes else ask_on_terminal,
               prefix_cache_gb=prefix_cache_gb if prefix_cache else 0.0, prefill_chunk=prefill_chunk)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
    cli.add_command(agent)
