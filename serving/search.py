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

import os

from absl import app, flags

from deep_retrieval import cli
from serving import describer

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    describer.define_flags()
    flags.DEFINE_string("query", None, "Query image file.")
    flags.DEFINE_list("box", None, "Query box x0,y0,x1,y1 in pixels.")
    flags.DEFINE_integer("top", 10, "Results to show.")
    flags.DEFINE_integer("qe", 0, "αQE with the top-k results (exact and flat indexes).")
    flags.DEFINE_boolean("rerank", False, "SuperGlobal re-ranking of the top 400 with global descriptors "
                         "(exact and flat indexes; instead of --qe).")
    flags.DEFINE_string("picture", None, "Write a PNG of the query and its results here.")
    flags.DEFINE_string("images_root", None, "Where result images are (default: the index's images_root).")


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
    from deep_retrieval.retrieval.index import Index

    index = Index.load(FLAGS.index)
    with open(FLAGS.query, "rb") as f:
        data = f.read()
    box, _ = describer.check_box(data, FLAGS.box)
    run = index.metadata.get("extraction") or {}
    version = run.get("model_version") if run.get("model_name") == FLAGS.model_name else None
    vector = describer.Describer(FLAGS.server, FLAGS.model_name, FLAGS.saved_model, version)(data, box)
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
