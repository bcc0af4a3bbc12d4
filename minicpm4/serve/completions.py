"""The two generating endpoints, /v1/chat/completions and /v1/completions: request -> prompt ids -> one engine
request per choice -> OpenAI response objects, whole or as server-sent events.

For trainers, /v1/completions also takes token-id prompts and returns token ids (return_token_ids), honours
stop_token_ids / ignore_eos, continues a seeded sample with seed_offset (protocol.replayed_generator), and every
response names the weight_version it ran on (serve/reload.py).

Text handling per choice is LLM.text_stream (stop strings and stop tokens never reach the client); with
`tools`, the model's text goes through minicpm4.text.tool_calls (rendered into the prompt, parsed back into
`tool_calls`, incrementally when streaming). A client that disconnects cancels its requests at once,
so its slots go to others.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from minicpm4.engine.async_engine import Stream
from minicpm4.errors import InputError
from minicpm4.serve.agent import run_agent
from minicpm4.serve.protocol import ChatCompletionRequest, CompletionRequest, replayed_generator, sampling_params
from minicpm4.text.tool_calls import StreamParser, parse_output, render_messages


class ClientGone(Exception):
    """A non-streaming client disconnected before its answer was ready."""


class Completions:
    def __init__(self, server):
        self.s = server  # minicpm4.serve.server.Server: llm, engine, limits, tool format

    # ---- shared ----
    async def submit(self, prompt: list[int], body) -> tuple[list[Stream], int]:
        """One engine request per choice, and the weights version they run on (waits while weights are swapped)."""
        llm, ctx = self.s.llm, self.s.llm.engine.max_len
        if len(prompt) >= ctx:
            raise InputError(f"prompt of {len(prompt)} tokens does not fit the context of {ctx} tokens")
        limit = body.token_limit
        if limit is not None and limit > self.s.max_tokens:
            raise InputError(f"max_tokens={limit} is above this server's limit of {self.s.max_tokens}")
        vocab = llm.model.config.vocab_size
        bad = [t for t in body.stop_token_ids or () if not 0 <= t < vocab]
        if bad:
            raise InputError(f"stop_token_ids: token id {bad[0]} is outside the vocabulary (size {vocab})")
        offset = getattr(body, "seed_offset", 0)
        if offset > ctx:
            raise InputError(f"seed_offset: {offset} is more tokens than the context of {ctx} can hold")
        max_new = min(limit if limit is not None else self.s.max_tokens, ctx - len(prompt))
        params = [sampling_params(body, max_new, llm.stop_token_ids, i) for i in range(body.n)]
        gens = [None] * body.n
        if offset:
            gens = [await asyncio.to_thread(replayed_generator, p, offset, vocab) for p in params]
        version = await self.s.weights.admitted()
        streams: list[Stream] = []  # from here to the return, no await: every stream runs on `version`
        try:
            for p, gen in zip(params, gens):
                streams.append(self.s.engine.submit(prompt, p, llm.stop_fn(body.stops), gen))
        except BaseException:
            for st in streams:
                self.s.engine.cancel(st)
            raise
        return streams, version

    def prompt_ids(self, p) -> list[int]:
        """/v1/completions' prompt (a string or token ids, alone or as a batch of one) as token ids."""
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise InputError("prompt: one prompt per request is supported (a string or a list of token ids)")
            p = p[0]
        if isinstance(p, str):
            return self.s.llm.encode_text(p)
        if not p:
            raise InputError("prompt: the list of token ids is empty")
        vocab = self.s.llm.model.config.vocab_size
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt: token id {bad[0]} is outside the vocabulary (size {vocab})")
        return list(p)

    async def collect(self, http: HTTPRequest, streams: list[Stream], body) -> list[str]:
        """Whole texts of every choice. A client that goes away meanwhile cancels them all at once (its
        `http.disconnect` wakes `gone`; serve/guard.py keeps it visible) and gets ClientGone."""
        async def one(st: Stream) -> str:
            ts = self.s.llm.text_stream(st.req.params, body.stops)
            parts = [ts.push(t) async for t in st]
            return "".join(parts) + ts.finish()

        async def gone() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass
        task = asyncio.gather(*(one(st) for st in streams))
        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            for st in streams:
                self.s.engine.cancel(st)
            await task  # the engine ends each cancelled stream at its next step
            raise ClientGone("the client closed the connection; its requests were cancelled")
        return task.result()

    def usage(self, prompt: list[int], streams: list[Stream]) -> dict:
        done = sum(len(st.generation.token_ids) for st in streams)
        # the prompt counts once however many choices share it, as OpenAI counts it: so do its cached tokens
        # (the first choice's; choices admitted together each prefill it, none having stored its blocks yet)
        cached = streams[0].generation.cached_tokens if streams else 0
        return usage_dict(len(prompt), done, cached)

    def token_text(self, token: int) -> str:
        return self.s.llm.tokenizer.decode([token])

    # ---- /v1/chat/completions ----
    async def chat(self, body: ChatCompletionRequest, http: HTTPRequest):
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        messages = [m.as_dict() for m in body.messages]
        if self.s.mcp is not None and not tools and body.tool_choice != "none":
            return await self.chat_mcp(body, http, messages)
        if body.tool_choice not in (None, "none") and not tools:  # OpenAI's rule
            raise InputError("tool_choice: only allowed when tools are given")
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            messages = render_messages(messages, tools or None, body.tool_choice, self.s.tool_format)
        if body.tool_choice == "none":
            tools = []
        prompt = self.s.llm.encode_chat(messages)
        streams, version = await self.submit(prompt, body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.s.model_name,
                "weight_version": version}
        if body.stream:
            return sse(self.chat_events(head, prompt, streams, body, tools), self, streams)
        texts = await self.collect(http, streams, body)
        choices = [self.chat_choice(i, text, st, tools) for i, (text, st) in enumerate(zip(texts, streams))]
        return {**head, "choices": choices, "usage": self.usage(prompt, streams)}

    async def chat_mcp(self, body: ChatCompletionRequest, http: HTTPRequest, messages: list[dict]):
        """The server's own MCP tools (serve --mcp): the tool-use loop runs here, the client gets the answer
        and, in `tool_messages`, the calls and results that led to it."""
        if body.n > 1 or body.logprobs or body.tool_choice not in (None, "auto"):
            raise InputError("n > 1, logprobs and tool_choice other than auto are not supported when the server "
                             "runs its MCP tools itself; send your own tools to get the calls back instead")
        used = [0, 0, 0]  # prompt, completion and cached prompt tokens over the tool loop's model turns

        async def complete(rendered: list[dict]) -> str:
            prompt = self.s.llm.encode_chat(rendered)
            streams, _ = await self.submit(prompt, body.model_copy(update={"n": 1}))
            text = (await self.collect(http, streams, body))[0]
            used[0] += len(prompt)
            used[1] += len(streams[0].generation.token_ids)
            used[2] += streams[0].generation.cached_tokens
            return text
        conversation = await run_agent(complete, self.s.mcp, messages, self.s.tool_format)
        answer = conversation[-1]["content"]
        usage = usage_dict(*used)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.s.model_name}
        steps = conversation[len(messages):-1]
        if not body.stream:
            return {**head, "object": "chat.completion", "usage": usage, "tool_messages": steps, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                 "finish_reason": "stop"}]}

        async def events():
            chunk = {**head, "object": "chat.completion.chunk"}
            yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": answer},
                                         "logprobs": None, "finish_reason": None}]}
            yield {**chunk, "tool_messages": steps, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                                  "finish_reason": "stop"}]}
        return sse(events(), self, [])

    def chat_choice(self, index: int, text: str, st: Stream, tools: list[dict]) -> dict:
        calls: list[dict] = []
        content: str | None = text
        if tools:
            content, calls = parse_output(text, tools, self.s.tool_format)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "logprobs": self.chat_logprobs(st),
                "finish_reason": "tool_calls" if calls else finish(st)}

    def chat_logprobs(self, st: Stream) -> dict | None:
        if st.req.params.logprobs is None:
            return None
        entry = lambda t, lp: {"token": self.token_text(t), "logprob": lp,  # noqa: E731
                               "bytes": list(self.token_text(t).encode())}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, (lp, top) in zip(st.generation.token_ids, st.generation.logprobs)]}

    async def chat_events(self, head: dict, prompt, streams: list[Stream], body, tools) -> AsyncIterator[dict]:
        head = {**head, "object": "chat.completion.chunk"}
        chunk = lambda i, delta, reason=None, **kw: {**head, "choices": [  # noqa: E731
            {"index": i, "delta": delta, "logprobs": kw.get("logprobs"), "finish_reason": reason}]}
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, kind, value in merged(self, streams, body, tools):
            if kind == "content":
                yield chunk(i, {"content": value})
            elif kind == "tool_call":
                yield chunk(i, {"tool_calls": [{"index": value.pop("_index"), **value}]})
            else:  # end of choice i: value = whether it made tool calls
                st = streams[i]
                lp = self.chat_logprobs(st)
                yield chunk(i, {}, "tool_calls" if value else finish(st), logprobs=lp)
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(prompt, streams)}

    # ---- /v1/completions ----
    async def complete(self, body: CompletionRequest, http: HTTPRequest):
        prompt = self.prompt_ids(body.prompt)
        if body.echo:
            raise InputError("echo is not supported")
        streams, version = await self.submit(prompt, body)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.s.model_name,
                "weight_version": version}
        if body.stream:
            return sse(self.completion_events(head, prompt, streams, body), self, streams)
        texts = await self.collect(http, streams, body)
        choices = [{"index": i, "text": text, "logprobs": self.completion_logprobs(st), "finish_reason": finish(st),
                    **self.token_ids(prompt, st, body)} for i, (text, st) in enumerate(zip(texts, streams))]
        return {**head, "choices": choices, "usage": self.usage(prompt, streams)}

    def token_ids(self, prompt: list[int], st: Stream, body: CompletionRequest) -> dict:
        if not body.return_token_ids:
            return {}
        return {"prompt_token_ids": prompt, "token_ids": list(st.generation.token_ids)}

    def completion_logprobs(self, st: Stream) -> dict | None:
        if st.req.params.logprobs is None:
            return None
        g = st.generation
        tokens = [self.token_text(t) for t in g.token_ids]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in g.logprobs],
                "top_logprobs": [{self.token_text(i): v for i, v in top} for _, top in g.logprobs],
                "text_offset": offsets}

    async def completion_events(self, head, prompt, streams, body) -> AsyncIterator[dict]:
        async for i, kind, value in merged(self, streams, body, []):
            if kind == "content":
                yield {**head, "choices": [{"index": i, "text": value, "logprobs": None, "finish_reason": None}]}
            elif kind == "end":
                st = streams[i]
                yield {**head, "choices": [{"index": i, "text": "", "logprobs": self.completion_logprobs(st),
                                            "finish_reason": finish(st), **self.token_ids(prompt, st, body)}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(prompt, streams)}


def usage_dict(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage object; cached: prompt tokens served from the prefix cache, not prefilled."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish(st: Stream) -> str:
    return "length" if st.generation.finish_reason == "length" else "stop"


async def merged(c: Completions, streams: list[Stream], body, tools) -> AsyncIterator[tuple[int, str, Any]]:
    """(choice, "content" | "tool_call" | "end", value) from all choices as they come."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, st: Stream) -> None:
        try:
            ts = c.s.llm.text_stream(st.req.params, body.stops)
            parser, n_calls = None, 0
            if tools:
                parser = StreamParser(c.s.tool_format, tools)

            async def emit(events):
                nonlocal n_calls
                for kind, value in events:
                    if kind == "tool_call":
                        value = {**value, "_index": n_calls}
                        n_calls += 1
                    if kind != "content" or value:
                        await out.put((i, kind, value))
            async for token in st:
                piece = ts.push(token)
                await emit(parser.push(piece) if parser else [("content", piece)])
            piece = ts.finish()
            await emit((parser.push(piece) + parser.finish()) if parser else [("content", piece)])
            await out.put((i, "end", n_calls > 0))
        except BaseException as e:
            await out.put((i, "error", e))

    tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                i, kind, value = await out.get()
                if kind == "error":
                    raise value
                yield i, kind, value
                if kind == "end":
                    break
    finally:
        for t in tasks:
            t.cancel()


def sse(events: AsyncIterator[dict], c: Completions, streams: list[Stream]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        except InputError as e:  # e.g. a tool call that fails its schema, found mid-stream
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
        finally:  # client gone (the server cancels this generator) or done: free the slots
            for st in streams:
                c.s.engine.cancel(st)
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
