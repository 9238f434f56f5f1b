"""``tritium serve``: an OpenAI-compatible HTTP server over tritium.inference.Engine (needs ``.[serve]``).

    from tritium.serve import create_app, BackgroundServer
    app = create_app(Engine(model, tok), "SmolLM2-135M-Instruct")
    with BackgroundServer(app) as srv:            # uvicorn on a free loopback port, in a thread
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")

The app (tritium.serve.app) runs the engine on its own thread (tritium.serve.worker) and exposes Prometheus
metrics (tritium.serve.metrics). docs/serve.md describes the endpoints, the parameters and the errors.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from .app import create_app  # noqa: F401


class BackgroundServer:
    """uvicorn serving app on host:port (port 0: a free one) in a background thread; a context manager.
    url: http://host:port once entered."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread: Optional[threading.Thread] = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread = threading.Thread(target=self.server.run, name="tritium-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port} "
                                   "(uvicorn's log above says why)")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()


__all__ = ["create_app", "BackgroundServer"]
