"""An async chat client for any OpenAI-compatible endpoint, with a concurrency limit and retries.

All synthesis goes through `ChatClient.chat(messages) -> str`. At most `concurrency` requests are in
flight (an asyncio.Semaphore). Transient failures - connection errors, timeouts, 429 and 5xx - are
retried up to `retries` times with exponential backoff and full jitter: sleep U(0, base * 2**attempt),
capped at `max_backoff`. Other 4xx (bad request, auth, unknown model) are the caller's mistake and
fail at once. The openai client's own retries are turned off so that this policy is the only one.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

from minicpm4.errors import MiniCPM4Error


class SynthesisError(MiniCPM4Error):
    """A request failed for good (non-retryable status, or retries exhausted)."""


@dataclass
class ClientSettings:
    base_url: str
    model: str
    api_key: str = "none"
    concurrency: int = 8
    retries: int = 4
    backoff: float = 0.5  # seconds; attempt k waits U(0, backoff * 2**k)
    max_backoff: float = 20.0
    timeout: float = 120.0
    temperature: float = 0.7
    max_tokens: int = 1024


class ChatClient:
    def __init__(self, settings: ClientSettings, seed: int = 0):
        from openai import AsyncOpenAI

        self.settings = settings
        self.client = AsyncOpenAI(base_url=settings.base_url, api_key=settings.api_key, max_retries=0,
                                  timeout=settings.timeout)
        self.limit = asyncio.Semaphore(settings.concurrency)
        self.rng = random.Random(seed)
        self.stats = Counter()  # requests, retries, failures, by status

    async def chat(self, messages: list[dict], **params) -> str:
        import openai

        s = self.settings
        kwargs = {"model": s.model, "messages": messages, "temperature": s.temperature,
                  "max_tokens": s.max_tokens, **params}
        for attempt in range(s.retries + 1):
            try:
                async with self.limit:
                    self.stats["requests"] += 1
                    reply = await self.client.chat.completions.create(**kwargs)
                return reply.choices[0].message.content or ""
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                self.stats[f"retryable_{getattr(e, 'status_code', 'connection')}"] += 1
                if attempt == s.retries:
                    self.stats["failures"] += 1
                    raise SynthesisError(f"{s.base_url}: gave up after {attempt + 1} attempts ({e})") from None
                self.stats["retries"] += 1
                await asyncio.sleep(self.rng.uniform(0, min(s.max_backoff, s.backoff * 2 ** attempt)))
            except openai.APIStatusError as e:
                self.stats["failures"] += 1
                raise SynthesisError(f"{s.base_url}: HTTP {e.status_code} ({e.message})") from None

    async def close(self) -> None:
        await self.client.close()
