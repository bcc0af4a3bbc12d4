"""Batch invariance: a request's tokens never depend on which other requests share its batch, on every kernel
tier this CPU runs, for the models `chat` / `serve` load by default (the default model with its Q4_1 weights
kept 4-bit, dtype auto) and for the same model with float weights (dtype auto: bf16 where the CPU has bf16 dot
products, fp32 elsewhere). Greedy, EOS ignored, so every row decodes the same number of steps."""

from chat_questions import QUESTIONS

from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.serve.llm import LLM


def _together_and_alone(llm):
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:10]]
    # a prefill chunk shorter than the prompts, so prompts are prefilled over several steps beside each other
    engine = Engine(llm.model, prefill_chunk=24, max_slots=16)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = [g.token_ids for g in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
    assert all(len(t) == 6 for t in together)


def test_int4_requests_together_equal_one_at_a_time_on_every_tier(tier, smollm_gguf):
    """The default model as `serve` loads it: int4 layers and int8 head on our few-row kernels, C++ stack."""
    _together_and_alone(LLM.load(smollm_gguf, dtype="auto", int4=True))


def test_float_requests_together_equal_one_at_a_time(smollm_gguf):
    """Float weights, dtype auto on the best tier (bf16 C++ stack where the CPU has bf16 dot products, else fp32
    Python layers, which use no kernel of ours: lower tiers would test nothing more)."""
    _together_and_alone(LLM.load(smollm_gguf, dtype="auto"))
