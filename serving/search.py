r"""Queries an index with one image and prints (and optionally draws) the results.

    python -m serving.search --index index/ --server localhost:8500 \
        --query photo.jpg [--box 10,20,200,180] --top 10 [--qe 2 | --rerank] [--picture results.png]

The query descriptor comes from a TF Serving server (``--server``, the
PredictionService protocol) or from an exported SavedModel run in process
(``--saved_model``). With ``--box`` the export's ``crops`` signature crops
the query inside the graph, keeping the image's scale, as the retrieval
protocols do. ``--picture`` writes a grid PNG: the query with its
box, then the results captioned with rank, score and file name (images are looked up
under the index's ``images_root``, or ``--images_root``). Through a server,
the query asks for the model version the index's descriptors were
extracted with, so that a newer model is never compared with them.
"""

import io
import os

from absl import app, flags

from deep_retrieval import cli

FLAGS = flags.FLAGS


def define_source_flags():
    """The index and where query descriptors come from (`Describer`): shared with `serving.web`."""
    flags.DEFINE_string("index", None, "Index folder (python -m serving.index).")
    flags.DEFINE_string("server", None, "host:port of a TF Serving (or embedded) server.")
    flags.DEFINE_string("model_name", "deep_retrieval", "ModelSpec.name on the server.")
    flags.DEFINE_string("saved_model", None, "An exported SavedModel folder, instead of --server.")


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    define_source_flags()
    flags.DEFINE_string("query", None, "Query image file.")
    flags.DEFINE_list("box", None, "Query box x0,y0,x1,y1 in pixels.")
    flags.DEFINE_integer("top", 10, "Results to show.")
    flags.DEFINE_integer("qe", 0, "αQE with the top-k results (exact and flat indexes).")
    flags.DEFINE_boolean("rerank", False, "SuperGlobal re-ranking of the top 400 with global descriptors "
                         "(exact and flat indexes; instead of --qe).")
    flags.DEFINE_string("picture", None, "Write a PNG of the query and its results here.")
    flags.DEFINE_string("images_root", None, "Where result images are (default: the index's images_root).")


def check_box(data, box):
    """``(box, pixels)``: ``box`` (``--box`` values, or None) as four floats,
    refused unless it crops the encoded image
    (`deep_retrieval.data.images.box_problem`), and the pixels the image's
    header declares; a ValueError when ``data`` is not a readable image."""
    from PIL import Image

    from deep_retrieval.data.images import box_problem

    try:
        im = Image.open(io.BytesIO(data))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"the query is not a readable image ({type(e).__name__}: {e})") from e
    with im:
        width, height = im.size
    if box is None:
        return None, width * height
    if len(box) != 4:
        raise ValueError(f"--box needs x0,y0,x1,y1, got {','.join(box)}")
    problem = box_problem(box, width, height)
    if problem:
        raise ValueError(f"--{problem}")
    return [float(v) for v in box], width * height


class Describer:
    """Descriptors of encoded images (cropped to a box by the model's
    ``crops`` signature): through a server (``server``, asking for model
    ``version`` if given) or an exported SavedModel loaded once
    (``saved_model``). Errors are ValueErrors saying why, in one line."""

    def __init__(self, server=None, model_name="deep_retrieval", saved_model=None, version=None):
        import tensorflow as tf

        self.server, self.version = server, version
        if saved_model:
            try:
                self.signatures = tf.saved_model.load(saved_model).signatures
            except (OSError, ValueError) as e:
                raise ValueError(f"{saved_model}: cannot load the SavedModel ({str(e).splitlines()[0][:200]})")
            return
        from serving import extract as extract_lib

        self.signatures = None
        replicas = extract_lib.Replicas([server])
        self.extractors = {name: extract_lib.Extractor(replicas, model_name, name, 60, 3, version)
                           for name in ("serving_default", "crops")}

    def __call__(self, data, box=None):
        import grpc
        import numpy as np
        import tensorflow as tf

        signature = "crops" if box else "serving_default"
        if self.signatures is not None:
            inputs = {"images": tf.constant([data])}
            if box:
                inputs["boxes"] = tf.constant([box], tf.float32)
            try:
                return self.signatures[signature](**inputs)["descriptors"].numpy()[0]
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(f"the query cannot be described: {e.message.splitlines()[0][:300]}") from None
        try:
            return np.asarray(self.extractors[signature].predict([data], [box] if box else None))[0]
        except grpc.RpcError as e:
            hint = ""
            if self.version is not None and e.code() == grpc.StatusCode.NOT_FOUND:
                hint = f" (the index holds descriptors of version {self.version}: serve it, or rebuild the index)"
            elif e.code() == grpc.StatusCode.UNAVAILABLE:
                hint = " (is the server running?)"
            details = " ".join((e.details() or "").split())[:300]
            raise ValueError(f"{self.server} answered {e.code().name}: {details}{hint}") from None


def fit(pen, text, width):
    """``text``, shortened from the left with an ellipsis until ``pen``
    draws it within ``width`` pixels (a file name keeps its end)."""
    if pen.textlength(text) <= width:
        return text
    while text and pen.textlength("…" + text) > width:
        text = text[1:]
    return "…" + text


def draw(query_path, box, results, images_root, out_path, thumb=200):
    """A grid PNG: the query (box in red), then each result, each inside
    its cell and captioned with its rank, score and file name."""
    from PIL import Image, ImageDraw

    def tile(path):  # (RGB image, scale from the file's pixels), None if missing, unreadable or oversized
        try:
            with Image.open(path) as im:
                width = im.width
                im.draft("RGB", (thumb, thumb))  # JPEGs decode at a fraction of their size
                im = im.convert("RGB")
                return im, im.width / width
        except (OSError, Image.DecompressionBombError, ValueError):
            return None

    query = tile(query_path)
    if query is None:
        raise ValueError(f"{query_path}: cannot draw the query image")
    query, scale = query
    if box:
        ImageDraw.Draw(query).rectangle([float(v) * scale for v in box], outline=(255, 0, 0), width=3)
    tiles = [(query, "query", os.path.basename(query_path))]
    for rank, (image_id, score) in enumerate(results, start=1):
        im = tile(os.path.join(images_root or "", image_id))
        if im is None:
            tiles.append((Image.new("RGB", (thumb, thumb), (60, 60, 60)), f"#{rank} {score:.3f} (missing)", image_id))
        else:
            tiles.append((im[0], f"#{rank} {score:.3f}", image_id))
    cols = min(6, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    cell, caption = thumb + 8, 30  # a margin between cells; two caption lines
    sheet = Image.new("RGB", (cols * cell, rows * (thumb + caption)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for i, (im, title, name) in enumerate(tiles):
        im.thumbnail((thumb, thumb))
        x, y = (i % cols) * cell + 4, (i // cols) * (thumb + caption)
        sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        pen.text((x, y + thumb + 2), title, fill=(0, 0, 0))
        pen.text((x, y + thumb + 15), fit(pen, name, thumb), fill=(60, 60, 60))
    sheet.save(out_path)


def main(argv):
    del argv
    if not FLAGS.index or not FLAGS.query or not (FLAGS.server or FLAGS.saved_model):
        raise app.UsageError("--index, --query and one of --server/--saved_model are required")
    if FLAGS.top < 1:
        raise app.UsageError(f"--top must be at least 1, got {FLAGS.top}")
    from deep_retrieval import search

    index = search.Index.load(FLAGS.index)
    with open(FLAGS.query, "rb") as f:
        data = f.read()
    box, _ = check_box(data, FLAGS.box)
    run = index.metadata.get("extraction") or {}
    version = run.get("model_version") if run.get("model_name") == FLAGS.model_name else None
    vector = Describer(FLAGS.server, FLAGS.model_name, FLAGS.saved_model, version)(data, box)
    if len(vector) != index.dim:
        raise ValueError(f"the model gives {len(vector)}-D descriptors, the index holds {index.dim}-D")
    scores, ids = index.search(vector[None], FLAGS.top, qe=FLAGS.qe, rerank=FLAGS.rerank)
    results = list(zip(ids[0], scores[0].tolist()))
    for rank, (image_id, score) in enumerate(results, start=1):
        print(f"{rank:3d}  {score:.4f}  {image_id}")
    if FLAGS.picture:
        root = FLAGS.images_root or index.metadata.get("images_root")
        draw(FLAGS.query, FLAGS.box, results, root, FLAGS.picture)
        print(f"picture written to {FLAGS.picture}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
