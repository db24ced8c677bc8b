"""The viewer's HTTP side: the standard library's ``ThreadingHTTPServer`` on 127.0.0.1.

Routes: ``GET /`` the page; ``GET /static/<name>`` one of the files shipped in ``static/`` (looked up by
name in a table built at start-up: a request path never reaches the file system, so ``..`` and encoded
tricks find nothing); ``GET /api/config`` the controls (:meth:`ViewerSession.describe`); ``POST /api/run``
a run (:meth:`ViewerSession.run`). Errors are JSON ``{"error", "field", "allowed"}``: 400 for a bad
request, 404 / 405 / 411 / 413 / 415 by name, 500 for a failure of ours (logged with its traceback).

The server has no authentication and runs the model for whoever asks, so it binds a loopback address
only unless ``allow_remote``; it also refuses requests whose ``Host`` header is not a loopback name (a
web page elsewhere cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from ..errors import InvalidArgumentError
from .session import ViewerRequestError, ViewerSession

__all__ = ["LOOPBACK_NAMES", "ViewerServer", "check_host", "make_server", "static_files"]

LOOPBACK_NAMES = ("localhost",)
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".png": "image/png", ".svg": "image/svg+xml"}
_CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 maybe in brackets) is this machine's loopback."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless ``allow_remote`` (``InvalidArgumentError`` says why)."""
    if not is_loopback(host) and not allow_remote:
        raise InvalidArgumentError(
            f"--host {host!r} would serve the viewer beyond this machine; it has no authentication and runs the "
            f"model (CPU/GPU time, uploaded images) for any request, so it serves 127.0.0.1 only. Pass "
            f"--allow-remote to serve on {host!r} anyway (e.g. inside a trusted network), or use an SSH tunnel"
        )


def static_files() -> dict[str, tuple[bytes, str]]:
    """``name -> (bytes, content type)`` of the files shipped in ``llava_deft/viewer/static/`` (read once)."""
    folder = resources.files("llava_deft.viewer") / "static"
    out = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    if "index.html" not in out:
        raise FileNotFoundError(f"the viewer's page is missing from {folder} (a broken install: reinstall llava-deft)")
    return out


class ViewerServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` holding the session and the static files; ``url`` once bound."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], session: ViewerSession, allow_remote: bool = False, quiet: bool = True):
        self.session, self.allow_remote, self.quiet = session, allow_remote, quiet
        self.files = static_files()
        self.max_body = 4 * (session.max_image_bytes // 3 + 1) + 64 * 1024 + 4 * session.max_text_chars
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, notebooks); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="llava-deft-viewer", daemon=True)
        thread.start()
        return thread


def make_server(session: ViewerSession, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
                quiet: bool = True) -> ViewerServer:
    """Bind a :class:`ViewerServer` (``port`` 0: a free one; see ``server.url``)."""
    check_host(host, allow_remote)
    return ViewerServer((host, port), session, allow_remote, quiet)


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "llava-deft-viewer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        if not self.server.quiet:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ replies
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data, allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str, field: str | None = None, allowed=None) -> None:
        self._json(status, {"error": message, "field": field, "allowed": allowed})

    def _host_ok(self) -> bool:
        if self.server.allow_remote:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if is_loopback(name):
            return True
        self._error(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this machine's loopback; open the viewer at "
                                          f"{self.server.url}", "Host")
        return False

    # ------------------------------------------------------------------ routes
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            name = "index.html"
        elif path.startswith("/static/"):
            name = path[len("/static/"):]
        elif path == "/api/config":
            return self._json(HTTPStatus.OK, self.server.session.describe())
        elif path == "/api/run":
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST a JSON request to /api/run", "method", ["POST"])
        else:
            return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path!r}", "path")
        if name not in self.server.files:  # the table of shipped files, never a path on disk
            return self._error(HTTPStatus.NOT_FOUND, f"no such file: {path!r}", "path", sorted(self.server.files))
        self._send(HTTPStatus.OK, *self.server.files[name])

    do_HEAD = do_GET

    def do_POST(self):  # noqa: N802
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path != "/api/run":
            self._drain()
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path!r}; POST to /api/run", "path")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header", "Content-Length")
        if int(length) > self.server.max_body:
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request of {int(length):,} bytes is over the limit of {self.server.max_body:,}",
                               "<body>", f"at most {self.server.max_body:,} bytes")
        body = self.rfile.read(int(length))
        if "json" not in (self.headers.get("Content-Type") or ""):
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json", "Content-Type",
                               ["application/json"])
        try:
            request = json.loads(body, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as err:
            return self._error(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {err}", "<body>")
        try:
            result = self.server.session.run(request)
        except ViewerRequestError as err:
            return self._json(HTTPStatus.BAD_REQUEST, err.payload())
        except Exception as err:  # noqa: BLE001 -- a failure of ours: the page says so, the log has the traceback
            traceback.print_exc(file=sys.stderr)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(err).__name__}: {err}")
        self._json(HTTPStatus.OK, result)

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.server.max_body:
            self.rfile.read(int(length))
        else:
            self.close_connection = True


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")

