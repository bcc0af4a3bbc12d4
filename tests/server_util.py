"""Run a real minicpm4 server (uvicorn on a free localhost port, in a thread) for the tests."""

import contextlib
import socket
import threading
import time

import uvicorn

from minicpm4.serve.server import Server, create_app


@contextlib.contextmanager
def running_server(llm, **settings):
    """Yields (base_url, Server); stops uvicorn and the engine thread afterwards."""
    server = Server(llm, "test-model", **settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
