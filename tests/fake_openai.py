"""A fake OpenAI-compatible chat endpoint for the synthesis tests: FastAPI + uvicorn in a thread, real HTTP.

`reply(prompt) -> str` decides each answer from the last user message. `failures` is a list of HTTP
statuses returned, in order, to the first requests (then normal service), to exercise retries. Requests
whose prompt contains "BADREQUEST" get a 400. The server records every prompt and the most requests it
ever had in flight at once. With `embed(texts) -> list of vectors` it also serves /v1/embeddings.
"""

import asyncio
import contextlib
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class FakeEndpoint:
    def __init__(self, reply, failures=(), delay=0.0, embed=None):
        self.reply, self.failures, self.delay, self.embed = reply, list(failures), delay, embed
        self.prompts, self.in_flight, self.max_in_flight, self.statuses = [], 0, 0, []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)
        if embed is not None:
            self.app.post("/v1/embeddings")(self.embeddings)

    async def embeddings(self, request: Request):
        body = await request.json()
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        vectors = self.embed(texts)
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "data": [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]}
                         for i, v in enumerate(vectors)]}

    async def complete(self, request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.failures:
                status = self.failures.pop(0)
                self.statuses.append(status)
                return JSONResponse({"error": {"message": f"injected {status}", "type": "server_error"}},
                                    status_code=status)
            if "BADREQUEST" in prompt:
                self.statuses.append(400)
                return JSONResponse({"error": {"message": "bad request", "type": "invalid_request"}},
                                    status_code=400)
            self.prompts.append(prompt)
            self.statuses.append(200)
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": self.reply(prompt)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        finally:
            self.in_flight -= 1


@contextlib.contextmanager
def serving(endpoint: FakeEndpoint):
    """Yields the base URL (http://127.0.0.1:PORT/v1) while uvicorn serves `endpoint` in a thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(endpoint.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("fake endpoint did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
