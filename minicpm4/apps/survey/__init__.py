"""MiniCPM4-Survey's Plan-Retrieve-Write loop over a local source folder, with checked citations.

    sources     read .txt/.md/.html/.pdf files and chunk them into passages
    embedders   dense embeddings: all-MiniLM-L6-v2 from its PyPI package, or any OpenAI /v1/embeddings
    index       the on-disk index (passages, bm25s, faiss), rebuilt only when the sources change
    retrieval   hybrid search: BM25 and dense ranks fused by reciprocal rank
    document    the survey being written: outline positions ("section-2/subsection-1") and their text
    protocol    the step format (thought, answer, tool call): prompts in, parsed steps out
    chat        the model: an OpenAI-compatible endpoint or minicpm4.LLM in process
    state       the run's state on disk, saved after every step (resume)
    loop        the step loop: prompt, parse, update, search or finalize
    judge       LLM-judge prompts: entailment (yes/no) and SurveyEval-style 1-5 scores
    citations   citation filtering (retrieved passages only), entailment flags, numbering, references
    evaluation  `eval survey`: judge scores, citation precision/recall, hallucinated citations
"""
