r"""A search page for an index, on loopback.

    python -m serving.web --index index/ --server localhost:8500 [--port 8080]
    python -m serving.web --index index/ --saved_model models/deep_retrieval/1

Open ``http://127.0.0.1:8080/``, drop or choose a query image (drag on it
to search a region), and the ranked results show with their file names and
scores; a click on a result searches with it. ``?q=NAME`` in the address
searches with an indexed image, as that click does.

    POST /api/search   multipart: image (the file), box "x0,y0,x1,y1" (optional), top (optional)
                       -> {"results": [{"image": NAME, "score": S}, ...]}
    GET  /images/NAME  an indexed image (names in the index only, under --images_root)

The query is described as `serving.search` does (through the server,
asking for the model version the index was extracted with, or by the
SavedModel in process), and a body that is not an image gets 400 with the
reason. Only the standard library serves it.
"""

import email.parser
import email.policy
import http.server
import json
import mimetypes
import os
import sys
import threading
from importlib import resources

from absl import app, flags

from deep_retrieval import cli

FLAGS = flags.FLAGS

MAX_QUERY_BYTES = 32 << 20
"""Largest request body (the query image and the form fields)."""


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    from serving.search import define_source_flags

    define_source_flags()
    flags.DEFINE_string("images_root", None, "Where the indexed images are (default: the index's images_root).")
    flags.DEFINE_integer("port", 8080, "Port of the page.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the page on every interface.")
    flags.DEFINE_integer("max_top", 200, "Most results one search may ask for.")


class BadQuery(ValueError):
    """A search request that is wrong (answered 400)."""


def form_fields(content_type, body):
    """``{name: bytes}`` of a ``multipart/form-data`` body."""
    if not content_type.startswith("multipart/form-data"):
        raise BadQuery("send the query as multipart/form-data (fields image, box, top)")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadQuery("the multipart body does not parse")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = part.get_payload(decode=True) or b""
    return fields


class Searcher:
    """Describes a query and searches the index (thread-safe)."""

    def __init__(self, index, describer, images_root=None, max_top=200):
        self.index, self.describer = index, describer
        self.images_root = images_root or index.metadata.get("images_root")
        self.names = set(index.ids)
        self.max_top = max_top

    def search(self, fields):
        """``{"results": [...]}`` for the form ``fields``; BadQuery says why not."""
        from serving.search import check_box

        data = fields.get("image")
        if not data:
            raise BadQuery("no query image (multipart field 'image')")
        try:
            top = int(fields.get("top") or 20)
        except ValueError:
            raise BadQuery(f"top must be a whole number, got {fields['top'][:20]!r}") from None
        if not 1 <= top <= self.max_top:
            raise BadQuery(f"top must be between 1 and {self.max_top}, got {top}")
        box = fields.get("box")
        try:
            box = check_box(data, box.decode().split(",") if box else None)
            vector = self.describer(data, box)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadQuery(str(e).replace("--box", "box")) from None
        if len(vector) != self.index.dim:
            raise ValueError(f"the model gives {len(vector)}-D descriptors, the index holds {self.index.dim}-D")
        scores, ids = self.index.search(vector[None], top)
        return {"results": [{"image": name, "score": float(score)}
                            for name, score in zip(ids[0], scores[0]) if name is not None]}

    def image_path(self, name):
        """The file of an indexed image, or None (not in the index, no root)."""
        if name not in self.names or not self.images_root:
            return None
        root = os.path.realpath(self.images_root)
        path = os.path.realpath(os.path.join(root, name))
        return path if path.startswith(root + os.sep) and os.path.isfile(path) else None


class Handler(http.server.BaseHTTPRequestHandler):
    """The page, its API and the indexed images; state is on ``server``."""

    protocol_version = "HTTP/1.1"
    timeout = 60
    server_version = "deep-retrieval-web"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _send(self, code, data, content_type):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, code, payload):
        self._send(code, json.dumps(payload).encode(), "application/json")

    def do_GET(self):
        from urllib.parse import unquote, urlsplit

        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._send(200, self.server.page, "text/html; charset=utf-8")
        if path.startswith("/images/"):
            file = self.server.searcher.image_path(unquote(path[len("/images/"):]))
            if file is None:
                return self._json(404, {"error": "not an indexed image"})
            with open(file, "rb") as f:
                data = f.read()
            return self._send(200, data, mimetypes.guess_type(file)[0] or "application/octet-stream")
        self._json(404, {"error": f"no such page: {path[:200]}"})

    def do_POST(self):
        if self.path.split("?", 1)[0] != "/api/search":
            return self._json(404, {"error": "POST /api/search"})
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            return self._json(411, {"error": "a Content-Length is required"})
        if int(length) > MAX_QUERY_BYTES:
            self.close_connection = True
            return self._json(413, {"error": f"the query has {length} bytes, at most {MAX_QUERY_BYTES}"})
        body = self.rfile.read(int(length))
        try:
            answer = self.server.searcher.search(form_fields(self.headers.get("Content-Type", ""), body))
        except BadQuery as e:
            return self._json(400, {"error": str(e)})
        except ValueError as e:  # the model and the index disagree, or the server is down
            return self._json(502, {"error": str(e)})
        self._json(200, answer)


class WebServer(http.server.ThreadingHTTPServer):
    """The search page for a `Searcher` (port 0 picks one)."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, searcher, port, host="127.0.0.1"):
        self.searcher = searcher
        self.page = resources.files("serving").joinpath("static/search.html").read_bytes()
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    @property
    def port(self):
        return self.server_address[1]

    def start(self):
        """Serves in a background thread."""
        threading.Thread(target=self.serve_forever, name="web", daemon=True).start()


def main(argv):
    del argv
    if not FLAGS.index or bool(FLAGS.server) == bool(FLAGS.saved_model):
        raise app.UsageError("--index and one of --server/--saved_model are required")
    from deep_retrieval import search
    from serving.search import Describer

    try:
        index = search.Index.load(FLAGS.index)
        run = index.metadata.get("extraction") or {}
        version = run.get("model_version") if run.get("model_name") == FLAGS.model_name else None
        describer = Describer(FLAGS.server, FLAGS.model_name, FLAGS.saved_model, version)
        web = WebServer(Searcher(index, describer, FLAGS.images_root, FLAGS.max_top), FLAGS.port, FLAGS.host)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not web.searcher.images_root:
        print("note: the index records no images_root and none was given: results show without pictures",
              file=sys.stderr)
    print(f"search page for {len(index)} images on http://{FLAGS.host}:{web.port}/ (Ctrl-C stops)", flush=True)
    try:
        web.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
