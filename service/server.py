"""Starting the HTTP service with uvicorn (loopback by default)."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from service.app import ServiceSettings, SimilarSearch, create_app
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
    insecure: bool = False  # allow a non-loopback host without a token
    views: bool = True  # average over the image and its mirror for heads fitted with views
    runtime: str | None = None  # None: the cache's own (extract.runtimes.checked_runtime)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(options: ServerOptions) -> None:
    """Refuse to serve beyond loopback without a token, unless told so (--insecure)."""
    if not 0 <= options.port <= 65535:
        raise HeadstartError(f"--port must be between 0 and 65535; got {options.port}.")
    if not is_loopback(options.host) and options.service.token is None and not options.insecure:
        raise HeadstartError(
            f"Listening on {options.host} lets other machines use the model; give --token "
            "(or HEADSTART_TOKEN), or --insecure to serve without one.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one sentence saying why there cannot be one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise HeadstartError(f"Cannot listen on {host!r} ({_reason(error)}).") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise HeadstartError(f"Port {port} on {host} is already in use; stop what uses it or "
                                 "choose another with --port.") from None
        raise HeadstartError(f"Cannot listen on {host}:{port} ({_reason(error)}).") from None
    return sock


def _reason(error: BaseException) -> str:
    return (getattr(error, "strerror", None) or str(error) or type(error).__name__).rstrip(".")


def similar_search(predictor: Any, cache: Any) -> SimilarSearch | None:
    """/similar's searches (a classifiers.similar.SimilarFinder): the cache's training features
    and the predictor's own forward pass for the cache (None when the predictor runs no
    backbone of that cache)."""
    from classifiers.similar import SimilarFinder

    if cache.fingerprint not in getattr(predictor, "backbones", {}):
        return None
    return SimilarFinder(cache, features=lambda pixels: predictor.features(pixels)[
        cache.fingerprint])


def serve(options: ServerOptions, announce: Callable[[str], None] = print,
          access_log: Callable[[str], None] | None = None) -> None:
    """Check the options, take the port, load the model once, then serve until interrupted."""
    import uvicorn

    from endtoend.predict import open_predictor

    check_access(options)
    sock = bind(options.host, options.port)
    try:
        store = Store(options.store)
        cache = store.find_cache(options.cache)
        predictor = open_predictor(store, cache, options.head, options.weights, options.runtime,
                                   options.views)
        app = create_app(predictor, options.service, access_log,
                         similar=similar_search(predictor, cache))
        port = sock.getsockname()[1]
        announce(f"Serving head {options.head} of cache {cache.name} on "
                 f"http://{options.host}:{port}/ (API docs at /docs); Ctrl-C stops.")
        if not is_loopback(options.host) and options.service.token is None:
            announce("Warning: listening beyond loopback without a token (--insecure); anyone "
                     "who can reach this port can use the model.")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
