"""Starting the HTTP service with uvicorn (loopback by default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.app import ServiceSettings, create_app
from store.errors import HeadstartError
from store.store import Store

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerOptions:
    """Where a server listens and what it serves."""

    head: str
    cache: str | None = None
    store: Path | None = None
    weights: str | None = None
    host: str = LOOPBACK
    port: int = 8000
    service: ServiceSettings = ServiceSettings()


def serve(options: ServerOptions, announce=print) -> None:
    """Load the model once, then serve until interrupted."""
    import uvicorn

    from endtoend.predict import open_predictor

    if not 0 <= options.port <= 65535:
        raise HeadstartError(f"--port must be between 0 and 65535; got {options.port}.")
    store = Store(options.store)
    cache = store.find_cache(options.cache)
    predictor = open_predictor(store, cache, options.head, options.weights)
    app = create_app(predictor, options.service)
    announce(f"Serving head {options.head} of cache {cache.name} on "
             f"http://{options.host}:{options.port}/ (API docs at /docs); Ctrl-C stops.")
    if options.host not in (LOOPBACK, "localhost", "::1") and options.service.token is None:
        announce("Warning: listening beyond loopback without --token; anyone who can reach "
                 "this port can use the model.")
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning",
                timeout_graceful_shutdown=5)
