"""``python -m layerscope serve RUN [--port 8080]``: the run's dashboard on 127.0.0.1, with the
interpretations the page writes saved to ``RUN/interpretations.json``.

Three paths exist, nothing else (404): ``/`` and ``/index.html`` (``RUN/dashboard/index.html``) and
``/interpretations.json`` (GET; PUT merges). The URL is never mapped onto the file system, so no
path can reach another file. The server binds the loopback address only, and answers only
requests that name it as their host (a web page elsewhere cannot reach it by rebinding a name
to 127.0.0.1) and, for a PUT, come from its own origin.

A PUT carries entries (seed 002's format, layerscope.web.interpretations); under a lock (a thread
lock and an flock on ``RUN/.interpretations.lock``, so two servers on one run are safe too) the
file is read, merged key by key (the newer ``lastModified`` wins), written to a temporary file,
fsynced and renamed into place, and the whole merged file is the answer. Concurrent saves each
merge into what the previous one wrote, so none drops another's edit. Bodies over ``max_body``
bytes are refused with 413 before being read.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, TextIO
from urllib.parse import urlsplit

from layerscope.errors import LayerScopeError
from layerscope.web import interpretations as interp
from layerscope.web.page import CSP

HOST = "127.0.0.1"
MAX_BODY = 8 << 20  # bytes of one PUT: a whole imported file of a large adapter fits
FILE = "interpretations.json"
PAGE = ("/", "/index.html")


class Store:
    """``RUN/interpretations.json``, read and merged under one lock per run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FILE
        self.lock_path = run_dir / f".{FILE[:-5]}.lock"
        self.lock = threading.Lock()
        interp.load(self.path)  # a damaged file stops the server before it could be overwritten

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.lock, open(self.lock_path, "a") as f:
            try:
                import fcntl
            except ImportError:  # no flock (Windows): the thread lock still orders this server's saves
                yield
                return
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> bytes:
        with self.locked():
            return json.dumps(interp.document(interp.load(self.path)), ensure_ascii=False).encode("utf-8")

    def put(self, incoming: dict[str, dict[str, Any]]) -> bytes:
        """Merge validated entries into the file and return the file's new contents."""
        with self.locked():
            entries = interp.load(self.path)
            interp.merge(entries, incoming)
            return interp.save(self.path, entries)


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "LayerScope"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle keep-alive connection holds its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": ctype, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                     "X-Frame-Options": "DENY", **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        if close:  # an unread body must not be taken for the next request
            self.close_connection = True
        self._send(status, (message + "\n").encode("utf-8"), headers={"Connection": "close"} if close else None)

    def _route(self) -> str | None:
        """The path asked for, or None after refusing a request from elsewhere."""
        if self.headers.get("Host", "").lower() not in self.server.hosts:
            self._error(HTTPStatus.MISDIRECTED_REQUEST, f"this server answers to {self.server.url} only")
            return None
        return urlsplit(self.path).path

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self._route()
        if path is None:
            return
        if path in PAGE:
            try:
                body = self.server.page.read_bytes()
            except OSError as e:
                return self._error(HTTPStatus.NOT_FOUND, f"no dashboard at {self.server.page}: {e.strerror}")
            self._send(HTTPStatus.OK, body, "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
        elif path == "/" + FILE:
            self._send(HTTPStatus.OK, self.server.store.read(), "application/json; charset=utf-8",
                       {"X-LayerScope": "interpretations"})
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found: this server has /, /index.html and /" + FILE)

    do_HEAD = do_GET

    def do_PUT(self) -> None:  # noqa: N802
        path = self._route()
        if path is None:
            return
        if path != "/" + FILE:
            return self._error(HTTPStatus.NOT_FOUND if path not in PAGE else HTTPStatus.METHOD_NOT_ALLOWED,
                               "only /" + FILE + " can be written", close=True)
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in self.server.origins:
            return self._error(HTTPStatus.FORBIDDEN, f"PUT from {origin} refused: only pages of "
                               f"{self.server.url} may save", close=True)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "a PUT needs a Content-Length", close=True)
        try:
            n = int(self.headers["Content-Length"])
            if n < 0:
                raise ValueError
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "bad Content-Length", close=True)
        if n > self.server.max_body:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request body of {n} bytes refused: at most {self.server.max_body}", close=True)
        body = self.rfile.read(n)
        if self.headers.get_content_type() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        try:
            incoming = interp.validate(json.loads(body.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, f"not JSON: {e}")
        except interp.InterpretationsError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        data = self.server.store.put(incoming)
        self._send(HTTPStatus.OK, data, "application/json; charset=utf-8", {"X-LayerScope": "interpretations"})

    def _not_allowed(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "GET, HEAD or PUT", close=True)

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class Server(ThreadingHTTPServer):
    """The HTTP server of one run directory (see the module docstring)."""

    daemon_threads = True  # an idle keep-alive connection must not hold up Ctrl-C; saves are waited for

    def __init__(self, run_dir: str | os.PathLike, port: int = 8080, max_body: int = MAX_BODY,
                 quiet: bool = False) -> None:
        run = Path(run_dir)
        self.page = run / "dashboard" / "index.html"
        if not self.page.is_file():
            raise LayerScopeError(f"{run}: no dashboard ({self.page}); run the workflow first "
                                  "(snakemake --cores 1 ... dashboard)")
        self.store = Store(run)
        self.max_body, self.quiet = max_body, quiet
        try:
            super().__init__((HOST, port), Handler)
        except OSError as e:
            raise LayerScopeError(f"cannot listen on {HOST}:{port}: {e.strerror}; choose another --port") from None
        self.port = self.server_address[1]
        self.url = f"http://{HOST}:{self.port}/"
        self.hosts = {f"{h}:{self.port}" for h in (HOST, "localhost")}
        self.origins = {f"http://{h}" for h in self.hosts}

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser dropping a keep-alive connection, or the server stopping under a connection
        # that waits for its next request, is no error worth a traceback on the terminal; the
        # ValueError is reading from the connection's file once it is closed.
        if isinstance(sys.exc_info()[1], (ConnectionError, OSError, ValueError)):
            return
        super().handle_error(request, client_address)


def make_server(run_dir: str | os.PathLike, port: int = 8080, max_body: int = MAX_BODY,
                quiet: bool = False) -> Server:
    """A bound, not yet running server (``serve_forever`` runs it); port 0 picks a free port."""
    return Server(run_dir, port, max_body, quiet)


def serve(run_dir: str | os.PathLike, port: int = 8080, out: TextIO = sys.stdout) -> None:
    """Serve until Ctrl-C (or SIGTERM), then wait for a save in progress and return."""
    server = make_server(run_dir, port)
    print(f"Serving {Path(run_dir)} at {server.url} (interpretations: {server.store.path}); Ctrl-C stops",
          file=out, flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop), signal.getsignal(signal.SIGINT)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl-C must not cut the wait for a save short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.server_close()
        with server.store.lock:  # a save under way finishes before the process ends
            pass
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    print("stopped", file=out, flush=True)
