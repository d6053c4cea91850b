"""A file server on 127.0.0.1 for the download tests: serves bytes from a
dict, honours ``Range`` (or ignores it, as some servers do), and can break a
transfer off halfway; it records every request's path and Range header."""

import contextlib
import http.server
import threading


class Files:
    """What the server serves and how; tests change it between requests."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []
        self.honour_range = True
        self.break_after = None  # bytes sent before the connection is dropped
        self.content_type = "application/octet-stream"


def _handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 (http.server's name)
            state.requests.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start, status = 0, 200
            wanted = self.headers.get("Range")
            if wanted and state.honour_range:
                start = int(wanted.split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            payload = body[start:]
            if state.break_after is not None:
                payload = payload[:state.break_after]
            self.wfile.write(payload)
            if state.break_after is not None:
                self.wfile.flush()
                self.connection.shutdown(2)

    return Handler


@contextlib.contextmanager
def serving(files):
    """Yields ``(base_url, Files)`` while a server runs in a thread."""
    state = Files(files)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
