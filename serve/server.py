"""Run the application under uvicorn: bind, serve until SIGINT/SIGTERM, answer what is in flight, exit.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the requests already in flight finish (up to
:data:`GRACEFUL_SHUTDOWN_S` seconds) and only then runs the application's shutdown, which drains the batcher. The
command's own logging setup is kept (``log_config=None``): uvicorn's lines follow ``--log_level`` like any library's,
and its access log (a line per request, never a header, so never the API key) shows with ``--log_level debug``.
"""

from __future__ import annotations

import logging

from .app import create_app
from .runtime import Runtime
from .settings import ServeSettings

logger = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 30
KEEP_ALIVE_S = 15


def run_server(settings: ServeSettings, host: str, port: int) -> int:
    """Serve ``settings`` on ``host:port`` until stopped; the exit code (1 when the model could not be loaded)."""
    import uvicorn

    state = {"code": 0}
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:
        state["code"] = 1
        if server is not None:
            server.should_exit = True

    runtime = Runtime(settings, on_fatal=stop)
    config = uvicorn.Config(
        create_app(settings, runtime), host=host, port=port, log_config=None, log_level=None, lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, timeout_keep_alive=KEEP_ALIVE_S, server_header=False,
        backlog=2048,
    )  # fmt: skip
    server = uvicorn.Server(config)
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logger.warning("Serving on %s without --api_key: anyone who can reach this address can use the server.", host)
    logger.info(
        "Serving %s on http://%s:%d (the search page at /, the API docs at /docs); /health answers 200 once the model "
        "is loaded.", settings.model, host, port,
    )  # fmt: skip
    server.run()
    return state["code"]
