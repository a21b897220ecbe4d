"""A running ``lookalike serve`` of the same collection answers ``lookalike search``.

A one-off search spends most of its time loading: the imports, the model, the index. A
server of the collection has them loaded. So ``lookalike serve`` announces itself in the
collection folder while it runs (:data:`SERVER_FILE`: its URL, process id, host name,
catalog, and a random key, readable by its owner only), and ``lookalike search`` sends the
query there over HTTP with the standard library alone (the image files' bytes and the
options; no numpy, no model). The server answers through the same search path as every
other interface (``SearchService`` -> ``Searcher``) on its local route, which answers only
requests that carry the key; the reply holds the results as the library returns them, so the
command line prints exactly what a local search would.

The server is used only when it can be trusted to answer as a local search would: the file
names this host, a live process and this collection's catalog; the search uses no option
this client cannot forward, and the default runtime. Anything else (no file, a dead
process, a refused or slow connection, an error reply, a reply of the wrong shape) and the
search runs locally, as if no server were there; errors then come from the local search,
worded as always. ``lookalike search --no-server`` always searches locally.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_FILE = "server.json"
# The HTTP header that carries the announced key, and the route that requires it.
KEY_HEADER = "X-Lookalike-Key"
LOCAL_SEARCH_PATH = "/local/search"
# A server that does not accept the connection this fast is treated as gone.
CONNECT_TIMEOUT = 0.5
# How long an accepted search may take (a re-ranked one reads local features).
ANSWER_TIMEOUT = 60.0

# The search arguments the local route takes, by the name the CLI parses them to.
_FORWARDED = {
    "k": "k",
    "metric": "metric",
    "threshold": "threshold",
    "where": "where",
    "near": "near",
    "within": "within",
    "sort": "sort",
    "qe": "query_expansion",
    "rerank": "rerank",
    "multi_crop": "multi_crop",
    "no_copy_views": "no_copy_views",
    "copies": "copies",
    "text": "text",
}
# Arguments that do not change what a search finds (or that are sent another way).
_NOT_SEARCH_OPTIONS = frozenset(
    {
        "collection",
        "db",
        "command",
        "run",
        "format",
        "json",
        "server",
        "images",
        "negatives",
        "weights",
        "runtime",
    }
)
_RESULT_FIELDS = frozenset({"id", "path", "score", "metadata", "width", "height"})


@dataclass(frozen=True)
class Announcement:
    """What a running server wrote about itself in the collection folder."""

    url: str
    pid: int
    host: str
    key: str
    db: str | None
    folder: str  # the collection folder, resolved: a copy of the folder is another collection


def connect_host(host: str) -> str:
    """The address a client on this machine reaches a server bound to ``host`` at."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def server_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` for a server bound to ``host`` (IPv6 literals in brackets)."""
    address = connect_host(host)
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


@contextlib.contextmanager
def announce(folder: Path, *, host: str, port: int, db: str | None) -> Iterator[str | None]:
    """Announce a server of the collection in ``folder`` while the block runs; yields the
    key its local route must require (None when it cannot be announced: port 0, whose real
    port is unknown here, or a folder that cannot be written, which only costs the speed-up).
    The file is removed on the way out unless another server announced itself since."""
    if port == 0:
        yield None
        return
    key = secrets.token_hex(16)
    announcement = {
        "url": server_url(host, port),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "key": key,
        "db": db,
        "folder": str(folder.resolve()),
    }
    path = folder / SERVER_FILE
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".json.part")
        try:
            # mkstemp makes the file readable by its owner only: the key stays private.
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(announcement, file)
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
    except OSError:
        yield None
        return
    terminate = _exit_on_sigterm()
    try:
        yield key
    finally:
        current = read_announcement(folder)
        if current is not None and current.key == key:
            path.unlink(missing_ok=True)
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _exit_on_sigterm() -> Any:
    """Make SIGTERM exit through ``finally`` blocks (uvicorn shuts down gracefully on it, then
    raises it again, which by default ends the process on the spot and would leave the
    announcement behind). Returns the handler to restore, or None when unchanged (not the
    main thread, or someone else handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    return previous


def read_announcement(folder: Path) -> Announcement | None:
    """The server announced in ``folder``, or None (no file, or one that cannot be read)."""
    try:
        data = json.loads((folder / SERVER_FILE).read_text(encoding="utf-8"))
        return Announcement(
            url=str(data["url"]),
            pid=int(data["pid"]),
            host=str(data["host"]),
            key=str(data["key"]),
            db=None if data.get("db") is None else str(data["db"]),
            folder=str(data["folder"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def live_server(folder: Path, db: str | None) -> Announcement | None:
    """The server announced in ``folder`` if it may answer for this collection: announced
    on this host, by a process that is alive, for this folder and the same catalog."""
    found = read_announcement(folder)
    if found is None or found.host != socket.gethostname() or found.db != db:
        return None
    if found.folder != str(folder.resolve()):
        return None  # the folder was copied or moved: the server serves the original
    try:
        os.kill(found.pid, 0)
    except ProcessLookupError:
        return None  # a server that was killed left its file: stale
    except PermissionError:
        pass  # alive, as another user
    except OSError:
        return None
    return found


def search_request(
    args: argparse.Namespace, weights: Sequence[float] | None
) -> dict[str, Any] | None:
    """The body of a local-route request for the parsed ``lookalike search`` arguments, or
    None when the search uses something a server cannot answer as a local search would (a
    runtime other than the default, an option this client does not know), or an image file
    cannot be read (the local search then reports it)."""
    options = vars(args)
    if options.get("runtime", "auto") != "auto":
        return None
    for name, value in options.items():
        unknown = name not in _FORWARDED and name not in _NOT_SEARCH_OPTIONS
        if unknown and value not in (None, False, 0, "", [], ()):
            return None  # added after this client was written: only a local search knows it
    body: dict[str, Any] = {target: options.get(name) for name, target in _FORWARDED.items()}
    try:
        body["images"] = [_file_base64(p) for p in options.get("images") or []]
        body["negatives"] = [_file_base64(p) for p in options.get("negatives") or []]
    except OSError:
        return None
    body["names"] = list(options.get("images") or [])
    body["weights"] = None if weights is None else list(weights)
    return body


def _file_base64(path: str) -> str:
    with open(path, "rb") as handle:
        return base64.b64encode(handle.read()).decode("ascii")


def search_remotely(
    args: argparse.Namespace, folder: Path, db: str | None, weights: Sequence[float] | None
) -> dict[str, Any] | None:
    """The reply of the server announced for the collection in ``folder`` to this search:
    ``metric``, ``threshold``, ``no_close_match``, ``best_score`` and ``results`` (each
    result's ``id``, ``path``, ``score``, ``metadata``, ``width``, ``height``), or None when
    no server may answer it (then search locally)."""
    server = live_server(folder, db)
    if server is None:
        return None
    body = search_request(args, weights)
    if body is None:
        return None
    try:
        reply = _post(server, json.dumps(body).encode("utf-8"))
    except (OSError, ValueError):
        return None  # refused, reset, timed out, or not HTTP: search locally
    return reply if _well_formed(reply) else None


def _post(server: Announcement, payload: bytes) -> Any:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"not a local server URL: {server.url}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT)
    try:
        connection.connect()
        assert connection.sock is not None  # connect() opened it
        connection.sock.settimeout(ANSWER_TIMEOUT)
        connection.request(
            "POST",
            LOCAL_SEARCH_PATH,
            body=payload,
            headers={"Content-Type": "application/json", KEY_HEADER: server.key},
        )
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise ValueError(f"the server answered {response.status}")
        return json.loads(data)
    finally:
        connection.close()


def _well_formed(reply: Any) -> bool:
    """Whether a reply has every field the command line prints."""
    if not isinstance(reply, dict) or not isinstance(reply.get("results"), list):
        return False
    if not set(reply) >= {"metric", "threshold", "no_close_match", "best_score"}:
        return False
    return all(isinstance(r, dict) and set(r) >= _RESULT_FIELDS for r in reply["results"])
