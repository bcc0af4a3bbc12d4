"""`minicpm4 eval ...`: evaluations of the paper's applications. `eval mcp` scores tool use over the bundled MCP
servers (minicpm4.apps.tool_eval); `eval mcp-cases` writes the generated cases, `eval mcp-sft-data` the
reverse-generated tool SFT chats and the non-tool control chats. Other evaluations add their command to `eval_group`.
"""

from __future__ import annotations

import json

import click

from minicpm4.cli.options import MODEL_HELP


@click.group("eval")
def eval_group():
    """Evaluations of the applications (MCP tool use, ...)."""


def _cases(cases_path, seed):
    from minicpm4.apps.tool_cases import generate_cases
    from minicpm4.apps.tool_eval import read_cases
    return read_cases(cases_path) if cases_path else generate_cases(seed)


@eval_group.command("mcp")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--base-url", default=None, help="Evaluate an OpenAI-compatible endpoint instead of a local model.")
@click.option("--served-model", default="default", show_default=True, help="The model name sent to --base-url.")
@click.option("--format", "fmt", type=click.Choice(["json", "minicpm"]), default=None,
              help="Tool-call format (default: detected from the local model; json for --base-url).")
@click.option("--cases", "cases_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Cases JSONL (default: generated with --seed).")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated cases.")
@click.option("--limit", type=int, default=None,
              help="Only N cases, evenly spaced through the file (so every server and kind stays in).")
@click.option("-o", "--out", "out_dir", required=True,
              help="Output folder: results.jsonl (a rerun resumes) and report.json.")
@click.option("--concurrency", default=8, show_default=True, help="Cases in flight (their turns share a batch).")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def mcp_eval(model_path, base_url, served_model, fmt, cases_path, seed, limit, out_dir, concurrency, max_new_tokens,
             dtype):
    """Tool-use accuracy over the bundled MCP servers: function name, argument names, argument values."""
    import asyncio

    from minicpm4.apps.tool_eval import evaluate, format_report
    if base_url and model_path:
        raise click.UsageError("give --model or --base-url, not both")
    cases = _cases(cases_path, seed)
    if limit is not None:
        if limit < 1:
            raise click.BadParameter("must be at least 1", param_hint="--limit")
        cases = [cases[i * len(cases) // limit] for i in range(min(limit, len(cases)))]
    meta = {"model": base_url and served_model or model_path or "default", "cases_file": cases_path, "seed": seed}

    def progress(record):
        click.echo(f"{record['id']} " + " ".join("".join("1" if s["scores"][lv] else "0" for s in record["steps"])
                                                   for lv in ("function_name", "argument_names", "argument_values")),
                   err=True)

    async def run():
        if base_url:
            from minicpm4.data.synth_client import ChatClient, ClientSettings
            client = ChatClient(ClientSettings(base_url=base_url, model=served_model, concurrency=concurrency))

            async def complete(messages):
                return await client.chat(messages, max_tokens=max_new_tokens, temperature=0.0)
            try:
                return await evaluate(cases, complete, fmt or "json", out_dir, concurrency, progress, meta)
            finally:
                await client.close()
        from minicpm4.apps.llm_batcher import BatchedComplete
        from minicpm4.serve.llm import LLM
        from minicpm4.text.tool_calls import detect_format
        llm = LLM.load(model_path, dtype=dtype, max_len=4096, max_slots=concurrency)
        complete = BatchedComplete(llm, max_new_tokens, max_batch=concurrency)
        found = fmt or detect_format(llm.tokenizer.chat_template, llm.tokenizer.backend.get_vocab())
        try:
            return await evaluate(cases, complete, found, out_dir, concurrency, progress, meta)
        finally:
            await complete.close()
    report = asyncio.run(run())
    click.echo(format_report(report))
    click.echo(f"report: {out_dir}/report.json")


@eval_group.command("mcp-cases")
@click.option("-o", "--out", "out_path", required=True, help="Cases JSONL to write.")
@click.option("--seed", default=0, show_default=True)
@click.option("--per-server", default=50, show_default=True, help="Cases per bundled server (30% multi-step).")
@click.option("--cross", default=10, show_default=True, help="Cross-server cases (calculator + notes).")
def mcp_cases(out_path, seed, per_server, cross):
    """Generate the MCP evaluation cases and check them on the real servers."""
    import asyncio
    from collections import Counter

    from minicpm4.apps.tool_cases import generate_cases
    from minicpm4.apps.tool_eval import check_cases
    from minicpm4.apps.tool_sft_data import write_jsonl
    cases = generate_cases(seed, per_server=per_server, cross=cross)
    asyncio.run(check_cases(cases))
    write_jsonl(out_path, cases)
    counts = Counter(f"{c['server']}/{c['kind']}" for c in cases)
    click.echo(json.dumps({"cases": len(cases), "steps": sum(len(c["steps"]) for c in cases), **counts}))


@eval_group.command("mcp-sft-data")
@click.option("--cases", "cases_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The eval cases to stay clear of (default: generated with --eval-seed).")
@click.option("--eval-seed", default=0, show_default=True)
@click.option("--seed", default=1, show_default=True, help="Seed of the training cases.")
@click.option("--per-server", default=40, show_default=True, help="Training cases per bundled server.")
@click.option("-o", "--out", "out_path", required=True, help="Tool chats JSONL to write.")
@click.option("--control", "control_path", default=None, help="Also write as many non-tool control chats here.")
def mcp_sft_data(cases_path, eval_seed, seed, per_server, out_path, control_path):
    """Tool-use SFT chats by reverse generation (no query or call shared with the eval cases), and a control."""
    import asyncio

    from minicpm4.apps.tool_sft_data import build_tool_chats, control_chats, train_cases, write_jsonl
    cases = train_cases(_cases(cases_path, eval_seed), per_server, seed)
    chats = asyncio.run(build_tool_chats(cases))
    write_jsonl(out_path, chats)
    summary = {"tool_chats": len(chats)}
    if control_path:
        write_jsonl(control_path, control_chats(len(chats), seed))
        summary["control_chats"] = len(chats)
    click.echo(json.dumps(summary))


def register(cli: click.Group) -> None:
    cli.add_command(eval_group)
