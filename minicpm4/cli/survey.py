"""`minicpm4 survey TOPIC --sources DIR -o survey.md` (MiniCPM4-Survey over local sources) and
`minicpm4 eval survey survey.md` (judge scores and citation quality as JSON).

`eval survey` joins the `eval` group when another module has registered it, or creates it: register this
module after the one that owns the group.
"""

from __future__ import annotations

import json

import click

from minicpm4.cli.options import MODEL_HELP


def endpoint_options(f):
    opts = [
        click.option("--base-url", default=None,
                     help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: the model in process)."),
        click.option("--model-name", default=None, help="Model id at --base-url (default: its first model)."),
        click.option("--api-key", envvar="OPENAI_API_KEY", default="none", help="Key for the endpoints."),
        click.option("--model", "model_path", default=None, help="In process: " + MODEL_HELP),
        click.option("--dtype", default="auto", show_default=True, help="In process: bf16 (auto on CPU) or fp32."),
        click.option("--int4", is_flag=True, help="In process: keep a GGUF's Q4_1 weights 4-bit (faster decode)."),
        click.option("--threads", type=int, default=None, help="In process: torch compute threads."),
        click.option("--context", default=8192, show_default=True,
                     help="Model context in tokens (prompt + reply); passages are cut to fit unless --sparse."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _model(base_url, model_name, api_key, model_path, dtype, int4, threads, context, sparse_config=None,
           what="--base-url"):
    from minicpm4.apps.survey.pipeline import make_model
    if threads and not base_url:
        import torch
        torch.set_num_threads(threads)
    return make_model(base_url, model_name, api_key, model_path, dtype, int4, sparse_config, context, what)


@click.command("survey")
@click.argument("topic")
@click.option("--sources", required=True, help="Folder of .txt/.md/.html/.pdf files to write from.")
@click.option("-o", "--out", required=True, help="Output Markdown; the run state goes to OUT.state.json.")
@endpoint_options
@click.option("--sparse", is_flag=True,
              help="InfLLM v2 on (in process) / on the server: retrieved passages go in whole, in one long prompt.")
@click.option("--sparse-config", default=None, help='In process: JSON sparse_config fields (implies --sparse).')
@click.option("--max-steps", default=12, show_default=True, help="Loop steps at most, then the survey is written.")
@click.option("--max-new-tokens", default=1024, show_default=True, help="Tokens per step at most.")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Step i samples with seed+i.")
@click.option("--judge-base-url", default=None, help="Entailment judge endpoint (default: the writing model).")
@click.option("--judge-model", default=None, help="Model id at --judge-base-url.")
@click.option("--index", "index_dir", default=None,
              help="Index folder (default: under $MINICPM4_HOME/survey_index, one per source folder and embedder).")
@click.option("--embed-base-url", default=None, help="OpenAI-compatible /v1/embeddings (default: all-MiniLM-L6-v2 offline).")
@click.option("--embed-model", default=None, help="Model id at --embed-base-url.")
@click.option("--chunk-words", default=160, show_default=True, help="Passage size in words.")
@click.option("--chunk-overlap", default=32, show_default=True, help="Words shared by windows of a long paragraph.")
@click.option("--guided", is_flag=True,
              help="For models too small for the step format: the loop plans and searches, the model writes "
                   "section titles and paragraphs.")
@click.option("--sections", default=4, show_default=True, help="With --guided: sections to plan.")
@click.option("--restart", is_flag=True, help="Discard a saved run state for OUT and start over.")
def survey_cmd(topic, sources, out, base_url, model_name, api_key, model_path, dtype, int4, threads, context, sparse,
               sparse_config, max_steps, max_new_tokens, temperature, seed, judge_base_url, judge_model, index_dir,
               embed_base_url, embed_model, chunk_words, chunk_overlap, guided, sections, restart):
    """Write a survey on TOPIC from the passages of --sources (Plan-Retrieve-Write); rerun to resume."""
    from pathlib import Path

    from minicpm4.apps.survey.loop import LoopSettings, run_survey
    from minicpm4.apps.survey.pipeline import make_retriever
    from minicpm4.cli.options import json_object

    if max_steps < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-steps")
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    sparse_fields = json_object(sparse_config, "--sparse-config") if sparse_config else ({} if sparse else None)
    model = _model(base_url, model_name, api_key, model_path, dtype, int4, threads, context, sparse_fields)
    judge = (_model(judge_base_url, judge_model, api_key, None, dtype, int4, threads, context, what="--judge-base-url")
             if judge_base_url else None)
    for m in (model, judge):  # a down endpoint fails here, before the index is built
        if m is not None:
            m.check()
    retriever = make_retriever(Path(sources), index_dir, embed_base_url, embed_model, api_key, chunk_words,
                               chunk_overlap, log)
    settings = LoopSettings(max_steps=max_steps, context=context, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, sparse=sparse_fields is not None, guided=guided,
                            guided_sections=sections)
    report = run_survey(topic, Path(out), model, retriever, settings, judge, context, restart, log)
    click.echo(f"{out}: {report['steps']} steps ({report['finish_reason']}), {report['passages_retrieved']} passages "
               f"retrieved, {len(report['references'])} cited; citations kept {report['citations_kept']}, removed "
               f"{report['citations_removed']}; {report['unsupported_sentences']} of {report['cited_sentences']} "
               "cited sentences flagged unsupported")


@click.command("survey")
@click.argument("survey_md")
@click.option("--state", "state_file", default=None, help="The run's state (default: SURVEY_MD.state.json).")
@click.option("-o", "--out", default=None, help="JSON report (default: SURVEY_MD.eval.json).")
@endpoint_options
def eval_survey(survey_md, state_file, out, base_url, model_name, api_key, model_path, dtype, int4, threads, context):
    """Score a finished survey with an LLM judge (--base-url, or a model in process): SurveyEval-style 1-5
    scores, AutoSurvey citation precision/recall, hallucinated citations."""
    from pathlib import Path

    from minicpm4.apps.survey.evaluation import evaluate
    from minicpm4.apps.survey.judge import Judge
    from minicpm4.apps.survey.state import load_state, state_path
    from minicpm4.errors import InputError
    from minicpm4.fileio import atomic_write_text

    md_path = Path(survey_md)
    if not md_path.is_file():
        raise InputError(f"{md_path}: no such survey file")
    state = load_state(Path(state_file) if state_file else state_path(md_path))
    model = _model(base_url, model_name, api_key, model_path, dtype, int4, threads, context, what="--base-url")
    model.check()
    name = f"{base_url} {getattr(model, 'model', '')}".strip() if base_url else (model_path or "default model")
    report = evaluate(state, md_path.read_text(encoding="utf-8"), Judge(model, context=context), name)
    out_path = Path(out) if out else md_path.with_name(md_path.name + ".eval.json")
    atomic_write_text(out_path, json.dumps(report, indent=1, ensure_ascii=False))
    s, c, h = report["scores"], report["citations"], report["hallucinated_citations"]
    click.echo(f"{out_path}: relevance {s['relevance']} coverage {s['coverage']} depth {s['depth']} novelty "
               f"{s['novelty']} (average {s['average']}); citation recall {c['citation_recall']} precision "
               f"{c['citation_precision']}; hallucinated citations {h['not_retrieved']}/{h['citations']}")


def register(cli: click.Group) -> None:
    cli.add_command(survey_cmd)
    group = cli.commands.get("eval")
    if group is None:
        @click.group("eval")
        def group():
            """Evaluations: generated surveys (and more as they are added)."""
        cli.add_command(group)
    group.add_command(eval_survey)
