"""OpenAI-compatible HTTP server: `minicpm4 serve` (FastAPI + uvicorn, the `serve` extra).

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (whole or streamed as server-sent events; token-id
prompts, and with return_token_ids the generated ids, for trainers), /health, /metrics (Prometheus text), a chat
page at /, and POST /update_weights_from_disk (admin key only; serve/reload.py). All requests share one engine
thread that batches decode steps across them (continuous batching, see engine/async_engine.py). With
`mcp_commands` the server starts those MCP servers and answers chat requests that bring no tools of their own by
running the tool-use loop itself (agent.run_agent) over the MCP tools.

Safe by default: binds 127.0.0.1; with an API key every /v1 route needs `Authorization: Bearer KEY` (401);
bodies over `max_request_bytes` get 413; more than max_slots running plus max_queue waiting get 429; bad
JSON, wrong field types, out-of-range values and prompts longer than the context get 400 with an
OpenAI-style error body. A 500 only ever means a bug.
"""

from __future__ import annotations

import hmac
from contextlib import AsyncExitStack, asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpm4.engine.async_engine import AsyncEngine, QueueFull
from minicpm4.errors import InputError
from minicpm4.serve.agent import AgentError, MCPTools
from minicpm4.serve.completions import ClientGone, Completions
from minicpm4.serve.guard import RequestGuard
from minicpm4.serve.llm import LLM
from minicpm4.serve.protocol import ChatCompletionRequest, CompletionRequest, ReloadWeightsRequest, error_body
from minicpm4.serve.reload import WeightReloader
from minicpm4.text.tool_calls import detect_format


class Server:
    def __init__(self, llm: LLM, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_tokens: int = 4096, max_request_bytes: int = 1 << 20, tool_format: str | None = None,
                 mcp_commands: list[str] | None = None, admin_key: str | None = None):
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.admin_key = admin_key or api_key  # may reload weights; None: nobody may
        self.max_tokens, self.max_request_bytes = max_tokens, max_request_bytes
        self.engine = AsyncEngine(llm.engine, max_queue=max_queue)
        self.weights = WeightReloader(llm, self.engine)
        if tool_format is None:
            tool_format = detect_format(llm.tokenizer.chat_template, llm.tokenizer.backend.get_vocab())
        self.tool_format = tool_format
        self.mcp_commands = list(mcp_commands or [])
        self.mcp = None  # MCPTools, started with the app (the MCP servers live on its event loop)


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async with AsyncExitStack() as stack:
            if server.mcp_commands:
                server.mcp = await stack.enter_async_context(MCPTools(server.mcp_commands))
            yield
        server.mcp = None
        server.engine.shutdown()

    app = FastAPI(title="minicpm4", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    completions = Completions(server)

    app.add_middleware(RequestGuard, api_key=server.api_key, max_bytes=server.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or (first.get("ctx") or {}).get("param")  # ctx: a check over the whole body
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError):
        return error(400, str(exc))

    @app.exception_handler(AgentError)
    async def tool_loop_failed(_: Request, exc: AgentError):  # an MCP server failed or the model looped
        return error(502, f"tool use failed: {exc}", "server_error", code="tool_loop_failed")

    @app.exception_handler(ClientGone)
    async def gone(_: Request, exc: ClientGone):  # nobody reads this; the access log shows 499, as nginx's
        return error(499, str(exc), code="client_closed_request")

    @app.exception_handler(QueueFull)
    async def busy(_: Request, exc: QueueFull):
        return error(429, f"server busy: {exc}", "rate_limit_error", code="queue_full")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": server.engine.running, "queued": server.engine.queued,
                "weight_version": server.weights.version}

    @app.post("/update_weights_from_disk")  # SGLang's endpoint and body; serve/reload.py
    async def update_weights(request: Request):
        if server.admin_key is None:
            return error(403, "weight reload is disabled: start the server with --admin-key (or --api-key)",
                         "permission_error", code="reload_disabled")
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {server.admin_key}".encode()):
            return error(401, "missing or wrong admin key (send Authorization: Bearer KEY)", "authentication_error",
                         code="invalid_api_key")
        try:
            body = ReloadWeightsRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        version = await server.weights.reload(body.model_path, body.weight_version)
        return {"success": True, "message": f"serving {body.model_path}", "weight_version": version}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.engine.prometheus()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "minicpm4"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await completions.chat(body, request)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        return await completions.complete(body, request)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        page = resources.files("minicpm4.serve") / "static" / "chat.html"
        if not page.is_file():
            return HTMLResponse("<p>minicpm4 server: the chat page is not installed.</p>")
        return HTMLResponse(page.read_text())

    return app


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    import uvicorn
    app = create_app(Server(llm, model_name, **settings))
    uvicorn.run(app, host=host, port=port, log_level="info")
