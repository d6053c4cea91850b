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
reason. Concurrent searches share a budget of declared pixels
(``--max_pixels_in_flight``, as the gRPC server does) and of request bytes;
a search that does not fit the bytes gets 429, one that does not fit the
pixels waits its turn. Indexed files are served only as the image type
their content shows. Only the standard library serves it
(`serving.httpd`: connection cap, ``Host`` check).
"""

import os
import re
import sys
from importlib import resources

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.data.image_headers import read_header
from deep_retrieval.data.images import MAX_PIXELS
from serving import describer, httpd

FLAGS = flags.FLAGS

MAX_QUERY_BYTES = 32 << 20
"""Largest request body (the query image and the form fields)."""

MAX_PARTS = 8
"""Most parts a search form may have (it has three)."""


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    describer.define_flags()
    flags.DEFINE_string("images_root", None, "Where the indexed images are (default: the index's images_root).")
    flags.DEFINE_integer("port", 8080, "Port of the page.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the page on every interface.")
    flags.DEFINE_integer("max_top", 200, "Most results one search may ask for.")
    flags.DEFINE_integer("max_pixels_in_flight", MAX_PIXELS, "Declared query pixels all searches together "
                         "may hold at once (about 26 bytes of memory each, measured); more wait.")
    flags.DEFINE_list("allowed_hosts", None, "Host names the page answers to (default: loopback names when "
                      "bound to loopback, any otherwise; * for any).")


class BadQuery(ValueError):
    """A search request that is wrong (answered 400)."""


def form_fields(content_type, body, max_parts=MAX_PARTS):
    """``{name: bytes}`` of a ``multipart/form-data`` body, cut out of it
    in one pass (each value copied once), at most ``max_parts`` parts."""
    if not content_type.startswith("multipart/form-data"):
        raise BadQuery("send the query as multipart/form-data (fields image, box, top)")
    match = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type)
    if not match:
        raise BadQuery("the multipart body has no boundary")
    delimiter = b"--" + (match[1] or match[2]).encode("latin-1")
    if body.count(delimiter) > max_parts + 1:
        raise BadQuery(f"the form has more than {max_parts} parts")
    fields, position = {}, body.find(delimiter)
    if position < 0:
        raise BadQuery("the multipart body does not parse")
    while True:
        start = position + len(delimiter)
        if body.startswith(b"--", start):
            return fields
        start += 2 if body.startswith(b"\r\n", start) else 0
        end = body.find(b"\r\n" + delimiter, start)
        head = body.find(b"\r\n\r\n", start, end)
        if end < 0 or head < 0:
            raise BadQuery("the multipart body does not parse")
        name = re.search(r'(?im)^content-disposition:[^\r\n]*?\bname="([^"]*)"',
                         bytes(body[start:head]).decode("latin-1"))
        if name:
            fields[name[1]] = bytes(memoryview(body)[head + 4:end])
        position = end + 2


class Searcher:
    """Describes a query and searches the index (thread-safe)."""

    def __init__(self, index, describer, images_root=None, max_top=200, max_pixels_in_flight=MAX_PIXELS):
        from serving.requests import PixelBudget

        self.index, self.describer = index, describer
        self.images_root = images_root or index.metadata.get("images_root")
        self.max_top = max_top
        self.budget = PixelBudget(max_pixels_in_flight)

    def search(self, fields):
        """``{"results": [...]}`` for the form ``fields``; BadQuery says why not."""
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
            box, pixels = describer.check_box(data, box.decode().split(",") if box else None)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadQuery(str(e).replace("--box", "box")) from None
        if pixels > MAX_PIXELS:
            raise BadQuery(f"the query declares {pixels} pixels, more than {MAX_PIXELS} (decompression bomb?)")
        with self.budget.hold(pixels):  # as the gRPC server's budget: concurrent queries wait their turn
            try:
                vector = self.describer(data, box)
            except ValueError as e:
                raise BadQuery(str(e)) from None
        if len(vector) != self.index.dim:
            raise ValueError(f"the model gives {len(vector)}-D descriptors, the index holds {self.index.dim}-D")
        scores, ids = self.index.search(vector[None], top)
        return {"results": [{"image": name, "score": float(score)}
                            for name, score in zip(ids[0], scores[0]) if name is not None]}

    def image_path(self, name):
        """The file of an indexed image, or None (not in the index, no root)."""
        if not self.images_root or name not in self.index.ids:  # a lookup in the id store, not a set in memory
            return None
        root = os.path.realpath(self.images_root)
        path = os.path.realpath(os.path.join(root, name))
        return path if path.startswith(root + os.sep) and os.path.isfile(path) else None


def image_type(data):
    """The image MIME type ``data``'s content shows (not its name), or None."""
    from PIL import Image

    try:
        kind = Image.MIME.get(read_header(data)[0] or "")
    except ValueError:
        return None
    return kind if kind and kind.startswith("image/") else None


class Handler(httpd.Handler):
    """The page, its API and the indexed images; state is on ``server``."""

    server_version = "deep-retrieval-web"

    def get(self):
        from urllib.parse import unquote, urlsplit

        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self.send(200, self.server.page, "text/html; charset=utf-8")
        if path.startswith("/images/"):
            file = self.server.searcher.image_path(unquote(path[len("/images/"):]))
            if file is None:
                return self.send_json(404, {"error": "not an indexed image"})
            with open(file, "rb") as f:
                data = f.read()
            kind = image_type(data)
            if kind is None:
                return self.send_json(415, {"error": "the indexed file is not an image this page serves"})
            return self.send(200, data, kind, [("Content-Security-Policy", "sandbox")])
        self.send_json(404, {"error": f"no such page: {path[:200]}"})

    def post(self):
        if self.path.split("?", 1)[0] != "/api/search":
            return self.send_json(404, {"error": "POST /api/search"})
        length = self.content_length(MAX_QUERY_BYTES)
        if length is None:
            return
        bodies = self.server.bodies
        if not bodies.hold(length):
            self.close_connection = True
            return self.send_json(429, {"error": "the page is busy with other searches; retry later"})
        try:
            body = self.read_body(length)
            if body is None:  # answered
                return
            fields = form_fields(self.headers.get("Content-Type", ""), body)
            del body
            answer = self.server.searcher.search(fields)
        except BadQuery as e:
            return self.send_json(400, {"error": str(e)})
        except ValueError as e:  # the model and the index disagree, or the server is down
            return self.send_json(502, {"error": str(e)})
        finally:
            bodies.release(length)
        self.send_json(200, answer)


class WebServer(httpd.Server):
    """The search page for a `Searcher` (port 0 picks one); request bodies
    in flight at most ``max_bytes_in_flight``."""

    def __init__(self, searcher, port, host="127.0.0.1", max_bytes_in_flight=4 * MAX_QUERY_BYTES,
                 allowed_hosts=None):
        self.searcher = searcher
        self.page = resources.files("serving").joinpath("static/search.html").read_bytes()
        self.bodies = httpd.ByteBudget(max_bytes_in_flight)
        super().__init__((host, port), Handler, "the page", allowed_hosts=allowed_hosts)


def main(argv):
    del argv
    if not FLAGS.index or bool(FLAGS.server) == bool(FLAGS.saved_model):
        raise app.UsageError("--index and one of --server/--saved_model are required")
    from deep_retrieval.retrieval.index import Index
    index = Index.load(FLAGS.index)
    run = index.metadata.get("extraction") or {}
    version = run.get("model_version") if run.get("model_name") == FLAGS.model_name else None
    describe = describer.Describer(FLAGS.server, FLAGS.model_name, FLAGS.saved_model, version)
    searcher = Searcher(index, describe, FLAGS.images_root, FLAGS.max_top, FLAGS.max_pixels_in_flight)
    web = WebServer(searcher, FLAGS.port, FLAGS.host, allowed_hosts=FLAGS.allowed_hosts)
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
