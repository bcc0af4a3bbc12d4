"""The data recipe: UltraClean quality filtering and UltraChat v2-style synthesis, built on datatrove.

preprocessing (paper's text normalisation) -> classifier (fastText train/score) -> quality_filter
(datatrove filter step) -> pipeline (reader, heuristics, dedup, executors); synthesis lives in
synth_client / synth_tracks / constraints. Heavy libraries (datatrove, fasttext, openai) are imported
by the modules that need them, never here.
"""
