"""The HTTP plumbing `serving.rest` and `serving.web` share: a threaded
server with a listen backlog, a cap on connection threads, a ``Host``
check and one log line per failure, and a handler base that answers every
failure with a status.

Behind a loopback address only loopback ``Host`` names are answered (a page
on another site that rebinds its DNS name to 127.0.0.1 gets 403), unless
``allowed_hosts`` names others; a server bound to another address answers
any ``Host`` unless ``allowed_hosts`` is given.
"""

import http.server
import ipaddress
import json
import socket
import sys
import threading
import time

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header):
    """The name of a ``Host`` header, lower-case, without its port."""
    header = (header or "").strip().lower()
    if header.startswith("["):  # [::1]:8080
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Handler(http.server.BaseHTTPRequestHandler):
    """One request; subclasses define ``get`` and ``post``. An exception
    they raise answers 500 and logs one line."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending is dropped
    body_seconds = 60  # a body must arrive whole within this (a client trickling bytes is dropped too)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def parse_request(self):
        if not super().parse_request():
            return False
        allowed = self.server.allowed_hosts
        if allowed is not None and host_name(self.headers.get("Host")) not in allowed:
            self.close_connection = True
            self.send_json(403, {"error": "unknown Host; start the server with --allowed_hosts to serve it"})
            return False
        return True

    def send(self, code, data, content_type, headers=()):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, code, payload):
        self.send(code, json.dumps(payload).encode(), "application/json")

    def refusing(self, code):
        """Called with the status of an early refusal (411, 400, 413, 408)
        before it is answered, so a client that then reads the metrics sees
        it counted. Does nothing here."""

    def _refuse_early(self, code, message):
        self.close_connection = True
        self.refusing(code)
        self.send_json(code, {"error": message})

    def content_length(self, limit):
        """The body's declared length; ``None`` once it has been answered
        (411 without one, 400 when it is not a number, 413 past ``limit``:
        the body is then not read and the connection closes)."""
        length = self.headers.get("Content-Length")
        error = None
        if length is None:
            error = 411, "a Content-Length is required"
        elif not (length.isascii() and length.isdigit() and len(length) <= 18):
            error = 400, f"Content-Length {length[:40]!r} is not a number of bytes"
        elif int(length) > limit:
            error = 413, f"the body has {length} bytes, at most {limit}"
        if error:
            self._refuse_early(*error)
            return None
        return int(length)

    def read_body(self, length):
        """The body of ``length`` bytes (a bytearray, read into once), or
        ``None`` once answered: 408 when it does not arrive whole within
        `body_seconds` in all, 400 when the client ends it early."""
        body, got = bytearray(length), 0
        view = memoryview(body)
        deadline = time.monotonic() + self.body_seconds
        try:
            while got < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                count = self.rfile.readinto1(view[got:])
                if not count:
                    break
                got += count
        except (TimeoutError, socket.timeout):
            got = -1
        finally:
            view.release()
            self.connection.settimeout(self.timeout)
        if got == length:
            return body
        if got < 0:
            self._refuse_early(408, f"the body did not arrive whole within {self.body_seconds} s")
        else:
            self._refuse_early(400, f"the body ended after {got} of {length} bytes")
        return None

    def do_GET(self):
        self._guard(self.get)

    def do_POST(self):
        self._guard(self.post)

    def get(self):
        self.send_json(405, {"error": "GET is not served here"})

    def post(self):
        self.send_json(405, {"error": "POST is not served here"})

    def _guard(self, method):
        try:
            method()
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - answered, and logged in one line
            self.server.log_failure(self, e)
            self.close_connection = True
            try:
                self.send_json(500, {"error": "internal error: see the server's log"})
            except OSError:
                pass


class Server(http.server.ThreadingHTTPServer):
    """A threaded HTTP server (port 0 picks one): at most
    ``max_connections`` connections served at once (more are answered 503
    and closed), a listen backlog of `request_queue_size`, the ``Host``
    check of the module docstring.

    Args:
        address: ``(host, port)``.
        handler: the `Handler` subclass.
        what: the server's name in errors (``"REST"``, ``"the page"``).
        max_connections: connection threads at most.
        allowed_hosts: ``Host`` names answered (see the module docstring);
            ``["*"]`` answers any.
    """

    daemon_threads = True
    allow_reuse_address = False  # a port in use is refused, never shared
    request_queue_size = 128

    def __init__(self, address, handler, what, max_connections=64, allowed_hosts=None):
        self.what = what
        self._connections = threading.BoundedSemaphore(max_connections)
        if allowed_hosts is not None and "*" in allowed_hosts:
            self.allowed_hosts = None
        elif allowed_hosts is not None:
            self.allowed_hosts = {host_name(h) for h in allowed_hosts}
        else:
            self.allowed_hosts = set(LOOPBACK_NAMES) | {address[0].lower()} if _is_loopback(address[0]) else None
        try:
            super().__init__(address, handler)
        except OSError as e:
            raise ValueError(f"cannot listen on {address[0]}:{address[1]} for {what}: {e.strerror or e}") from None

    @property
    def port(self):
        return self.server_address[1]

    def start(self):
        """Serves in a background thread."""
        threading.Thread(target=self.serve_forever, name=self.what, daemon=True).start()

    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def log_failure(self, handler, error):
        """One line for a request that failed inside the server."""
        line = " ".join(str(error).split())[:300]
        print(f"{self.what}: {handler.command} {handler.path[:100]}: {type(error).__name__}: {line}",
              file=sys.stderr, flush=True)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        line = " ".join(str(error).split())[:300]
        print(f"{self.what}: connection from {client_address[0]}: {type(error).__name__}: {line}",
              file=sys.stderr, flush=True)


class ByteBudget:
    """Request bytes all requests together may hold at once; a request
    that does not fit is refused at once (`hold` returns False)."""

    def __init__(self, capacity):
        self.capacity, self.used = int(capacity), 0
        self._lock = threading.Lock()

    def hold(self, nbytes):
        with self._lock:
            if self.used and self.used + nbytes > self.capacity:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes):
        with self._lock:
            self.used -= nbytes
