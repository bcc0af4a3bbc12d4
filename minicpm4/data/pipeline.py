"""The UltraClean filtering job: datatrove pipelines for read -> heuristics -> classifier -> dedup -> write.

Layout under the output folder:
    kept/<rank>.jsonl           documents that passed everything (quality_score in metadata)
    rejected/<step>/<rank>.jsonl  dropped documents with metadata.filter_reason (input, heuristics,
                                quality, dedup)
    logs/<stage>/               datatrove logging dirs: completions/ (resume markers), stats/, logs/
    inputs.txt                  the input file list, fixed at the first run so sharding never changes

Stages run one after the other, each by its own executor. Without dedup there is one stage ("filter",
writing kept/). With dedup, "filter" writes filtered/ and the dedup stages read it: exact = signature ->
find (1 task) -> dedup; minhash = signature -> buckets (one task per bucket) -> cluster (1 task) -> dedup.
Multi-stage dedup reads a stage's output again rather than recomputing the classifier.

Resuming: every executor skips tasks with a completion marker, and writers rename their files into place
only at task end (writer.py), so rerunning the same command after an interruption redoes only the
unfinished tasks and the output equals an uninterrupted run's.

`build_stages` returns plain lists of datatrove steps, so the same stages run under datatrove's
SlurmPipelineExecutor or RayPipelineExecutor: pass `stage.pipeline` and `stage.tasks` to them, chaining
stages with `depends=` (see README, "Data").
"""

import os
from dataclasses import dataclass
from pathlib import Path

from minicpm4.children import forks_die_with_parent
from minicpm4.data.filter_report import job_report
from minicpm4.errors import ConfigError
from minicpm4.fileio import atomic_write_text

HEURISTICS = ("gopher_quality", "gopher_repetition", "fineweb_quality")
DEDUP = ("none", "exact", "minhash")


@dataclass
class FilterJob:
    inputs: list[str]
    output: str
    classifier: str | None = None
    threshold: float = 0.5
    heuristics: tuple[str, ...] = ()
    dedup: str = "none"
    text_key: str = "text"
    tasks: int = 0  # 0 = one task per input file
    workers: int = 1
    batch_size: int = 256


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int
    workers: int = 1


def doc_bytes(doc) -> bytes:
    """Exact dedup's content: datatrove reads the (runtime) return annotation to pick the hash input type,
    hence no `from __future__ import annotations` in this module."""
    return doc.text.encode("utf-8")


def list_inputs(inputs: list[str]) -> list[str]:
    """Expand files and directories (recursively) into a sorted list of absolute file paths."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += [str(f.resolve()) for f in p.rglob("*")
                      if (f.is_file() or f.is_fifo()) and not any(part.startswith(".") for part in f.parts)]
        elif p.exists():
            files.append(str(p.resolve()))
        else:
            raise ConfigError(f"input {item}: no such file or directory")
    if not files:
        raise ConfigError(f"inputs {inputs}: no files")
    return sorted(set(files))


def fix_inputs(job: FilterJob) -> tuple[str, str, int]:
    """Write (first run) or check (resume) out/inputs.txt; return (root, paths file, number of files).
    Files under the output folder are never inputs (an output folder may sit inside the input folder)."""
    out = Path(job.output).resolve()
    files = [f for f in list_inputs(job.inputs) if not Path(f).is_relative_to(out)]
    if not files:
        raise ConfigError(f"inputs {job.inputs}: no files outside the output folder {job.output}")
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    listing = "".join(os.path.relpath(f, root) + "\n" for f in files)
    paths_file = Path(job.output) / "inputs.txt"
    if paths_file.is_file():
        if paths_file.read_text() != listing:
            raise ConfigError(f"{paths_file}: the input files differ from the interrupted run's; "
                              f"use a new output folder or restore the inputs")
    else:
        atomic_write_text(paths_file, listing)
    return root, str(paths_file), len(files)


def build_stages(job: FilterJob) -> list[Stage]:
    from datatrove.pipeline.readers import JsonlReader

    from minicpm4.data.reader import CorpusReader  # datatrove: imported when a job is built
    from minicpm4.data.writer import AtomicJsonlWriter

    if job.dedup not in DEDUP:
        raise ConfigError(f"dedup {job.dedup!r}: choose one of {DEDUP}")
    if job.classifier and not Path(job.classifier).is_file():  # fail here, not in every worker
        raise ConfigError(f"classifier {job.classifier}: no such file")
    if not 0.0 <= job.threshold <= 1.0:
        raise ConfigError(f"threshold {job.threshold}: must be in [0, 1]")
    out = Path(job.output)
    root, paths_file, n_files = fix_inputs(job)
    tasks = job.tasks or n_files

    def rejects(step: str):
        return AtomicJsonlWriter(str(out / "rejected" / step))

    steps = [CorpusReader(root, paths_file=paths_file, text_key=job.text_key, rejects_writer=rejects("input"))]
    steps += [_heuristic(name, rejects(name)) for name in job.heuristics]
    if job.classifier:
        from minicpm4.data.quality_filter import QualityFilter  # fastText only for a classifier step
        steps.append(QualityFilter(job.classifier, job.threshold, rejects("quality"), job.batch_size))
    filtered = out / ("kept" if job.dedup == "none" else "filtered")
    steps.append(AtomicJsonlWriter(str(filtered)))
    stages = [Stage("filter", steps, tasks, job.workers)]
    if job.dedup != "none":
        def reread():
            return JsonlReader(str(filtered), glob_pattern="*.jsonl", add_file_path=False)
        dedup = _exact if job.dedup == "exact" else _minhash
        stages += dedup(out, tasks, job.workers, reread, rejects("dedup"), AtomicJsonlWriter(str(out / "kept")))
    return stages


def _heuristic(name: str, rejects):
    from minicpm4.data.word_tokenizer import RegexWordTokenizer  # datatrove's tokenizer base

    words = RegexWordTokenizer()
    if name == "gopher_quality":
        from datatrove.pipeline.filters import GopherQualityFilter
        return GopherQualityFilter(exclusion_writer=rejects, language=words)
    if name == "gopher_repetition":
        from datatrove.pipeline.filters import GopherRepetitionFilter
        return GopherRepetitionFilter(exclusion_writer=rejects, language=words)
    if name == "fineweb_quality":
        from datatrove.pipeline.filters import FineWebQualityFilter
        return FineWebQualityFilter(exclusion_writer=rejects, language=words)
    raise ConfigError(f"heuristic {name!r}: choose from {HEURISTICS}")


def _exact(out, tasks, workers, reread, rejects, kept) -> list[Stage]:
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)

    cfg = ExactDedupConfig(content_getter=doc_bytes)
    sigs, dups = str(out / "dedup" / "signatures"), str(out / "dedup" / "duplicates")
    return [Stage("dedup_signature", [reread(), ExactDedupSignature(sigs, cfg)], tasks, workers),
            Stage("dedup_find", [ExactFindDedups(sigs, dups, cfg)], 1),
            Stage("dedup", [reread(), ExactDedupFilter(dups, cfg, exclusion_writer=rejects), kept], tasks, workers)]


def _minhash(out, tasks, workers, reread, rejects, kept) -> list[Stage]:
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)

    from minicpm4.data.word_tokenizer import RegexWordTokenizer  # datatrove's tokenizer base

    cfg = MinhashConfig()
    d = out / "dedup"
    sigs, buckets, clusters = str(d / "signatures"), str(d / "buckets"), str(d / "clusters")
    return [Stage("dedup_signature", [reread(), MinhashDedupSignature(sigs, cfg, language=RegexWordTokenizer())],
                  tasks, workers),
            Stage("dedup_buckets", [MinhashDedupBuckets(sigs, buckets, config=cfg)], cfg.num_buckets, workers),
            Stage("dedup_cluster", [MinhashDedupCluster(buckets, clusters, config=cfg)], 1),
            Stage("dedup", [reread(), MinhashDedupFilter(clusters, exclusion_writer=rejects), kept], tasks, workers)]


def run_job(job: FilterJob) -> dict:
    """Run (or resume) every stage with LocalPipelineExecutor; return the merged report."""
    from datatrove.executor import LocalPipelineExecutor


    for stage in build_stages(job):
        # fork: workers inherit the imported modules instead of re-importing torch & co. per worker; they and
        # datatrove's manager process die with this one, even under kill -9 (children.py)
        with forks_die_with_parent():
            LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(stage.workers, stage.tasks),
                                  logging_dir=str(Path(job.output) / "logs" / stage.name), start_method="fork").run()
    return job_report(job.output)
