"""The model behind the loop and the judge: any OpenAI-compatible endpoint, or minicpm4.LLM in this process.

Both expose `chat(messages, max_tokens, temperature) -> str` and `count_tokens(text)`. Over HTTP the token
count is estimated (4 characters a token), since the endpoint's tokenizer is not at hand; it only decides how
far passages are cut when the prompt must fit a dense context. An endpoint that cannot be reached fails with
one clear EndpointError at start-up (`check`), not a traceback in the middle of a run.
"""

from __future__ import annotations

from minicpm4.errors import MiniCPM4Error


class EndpointError(MiniCPM4Error):
    """The chat endpoint is down, refused the request, or answered with an error."""


class EndpointChat:
    def __init__(self, base_url: str, model: str | None = None, api_key: str = "none", timeout: float = 600.0,
                 retries: int = 2, what: str = "--base-url"):
        from openai import OpenAI

        self.base_url, self.model, self.what = base_url.rstrip("/"), model, what
        self.client = OpenAI(base_url=self.base_url, api_key=api_key, max_retries=retries, timeout=timeout)

    def check(self) -> None:
        """Fail early and clearly when the endpoint is down; pick its first model when none was named."""
        import openai
        try:
            models = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as e:
            raise EndpointError(f"{self.what} {self.base_url}: endpoint not reachable ({e.__cause__ or e}); "
                                "start one with `minicpm4 serve` or check the URL") from None
        except openai.NotFoundError:
            models = []  # some servers have no /models route; chat may still work
        except openai.APIStatusError as e:
            raise EndpointError(f"{self.what} {self.base_url}: HTTP {e.status_code} on /models ({e.message})") from None
        if self.model is None:
            self.model = models[0] if models else "default"

    def chat(self, messages: list[dict], max_tokens: int = 1024, temperature: float = 0.0, seed: int | None = None) -> str:
        import openai
        if self.model is None:
            self.check()
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                        temperature=temperature, seed=seed)
        except openai.APIConnectionError as e:
            raise EndpointError(f"{self.what} {self.base_url}: endpoint not reachable ({e.__cause__ or e}); "
                                "rerun the same command to resume once it is back") from None
        except openai.APIStatusError as e:
            raise EndpointError(f"{self.what} {self.base_url}: HTTP {e.status_code} ({e.message})") from None
        return reply.choices[0].message.content or ""

    @staticmethod
    def count_tokens(text: str) -> int:
        return len(text) // 4 + 1


class LocalChat:
    """minicpm4.LLM in this process (the default model unless `model` names another)."""

    def __init__(self, llm):
        self.llm = llm

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "auto", int4: bool = False, sparse_config: dict | None = None,
             max_len: int = 8192) -> "LocalChat":
        from minicpm4.serve.llm import LLM
        overrides = {"sparse_config": sparse_config} if sparse_config is not None else None
        return cls(LLM.load(model, dtype=dtype, config_overrides=overrides, int4=int4, max_len=max_len, max_slots=1))

    def check(self) -> None:
        pass

    def chat(self, messages: list[dict], max_tokens: int = 1024, temperature: float = 0.0, seed: int | None = None) -> str:
        from minicpm4.engine.sampling import SamplingParams
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
        return self.llm.chat(messages, params).text

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenizer.encode(text, add_special_tokens=False))

    @property
    def context_len(self) -> int:
        return self.llm.engine.max_len
