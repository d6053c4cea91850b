r"""Draws the regions a descriptor model pools and measures their box recall.

    python -m training.visualize_proposals --model runs/rpn/model.keras
    python -m training.visualize_proposals --model M --boxes boxes.csv \
        --images_dir DIR --output proposals.png --draw 16

Writes a PNG (by default ``proposals.png`` beside the model, in its run
folder) of one image with its top ``--draw`` regions (RPN proposals by
decreasing objectness, or the rigid grid) and its landmark box in green, and
prints the recall of the landmark boxes at IoU >= ``--iou`` for the top
16/64/256 proposals next to the rigid R-MAC grid's best region. Boxes come
from ``--boxes`` (CSV ``image,x0,y0,x1,y1`` relative to ``--images_dir``);
by default, from the held-out split of the built-in synthetic dataset.
"""

import json
import os
import sys

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.io.atomic import atomic_text, atomic_write

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("model", None, "A .keras descriptor model (regions 'rpn' or 'grid').")
    flags.DEFINE_string("boxes", None, "CSV image,x0,y0,x1,y1 (default: the synthetic held-out split).")
    flags.DEFINE_string("images_dir", None, "Folder the --boxes image names are relative to "
                        "(default: the CSV's folder, then its jpg/ subfolder).")
    flags.DEFINE_integer("image_size", None, "Longest image side (default: the one the model carries).")
    flags.DEFINE_list("top", ["16", "64", "256"], "Recall of the best k proposals for each k.")
    flags.DEFINE_float("iou", 0.5, "IoU for a proposal to recall a box.")
    flags.DEFINE_string("output", None, "PNG to write (default: proposals.png beside --model, in its run folder).")
    flags.DEFINE_string("image", None, "Image of --boxes to draw (default: the first).")
    flags.DEFINE_integer("draw", 16, "Regions drawn.")
    flags.DEFINE_integer("limit", 0, "Measure recall on the first N images only (0: all).")
    flags.DEFINE_string("output_json", None, "Write the recall figures here.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")


def _resolve_path(images_dir, name):
    for candidate in (os.path.join(images_dir, name), os.path.join(images_dir, "jpg", name),
                      os.path.join(images_dir, "jpg", name + ".jpg"), os.path.join(images_dir, name + ".jpg")):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_boxes(csv_path, images_dir=None):
    """``(paths, boxes [n, 4])`` from a box CSV; rows whose image is missing
    are reported on stderr and skipped."""
    import pandas as pd

    frame = pd.read_csv(csv_path)
    missing = {"image", "x0", "y0", "x1", "y1"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
    images_dir = images_dir or os.path.dirname(os.path.abspath(csv_path))
    paths, boxes = [], []
    for row in frame.itertuples(index=False):
        path = _resolve_path(images_dir, str(row.image))
        if path is None:
            print(f"warning: {csv_path}: image {row.image} not found under {images_dir}; skipped",
                  file=sys.stderr)
            continue
        paths.append(path)
        boxes.append((row.x0, row.y0, row.x1, row.y1))
    if not paths:
        raise ValueError(f"{csv_path}: no image found under {images_dir}")
    return paths, boxes


def draw(path, regions, box, output):
    """Writes ``path`` with ``regions`` (red to yellow by rank) and ``box`` (green)."""
    from PIL import Image, ImageDraw

    with Image.open(path) as im:
        image = im.convert("RGB")
    canvas = ImageDraw.Draw(image)
    for rank, region in enumerate(reversed(regions)):
        shade = int(255 * rank / max(len(regions) - 1, 1))
        canvas.rectangle([float(v) for v in region], outline=(255, shade, 0), width=1)
    if box is not None:
        canvas.rectangle([float(v) for v in box], outline=(0, 255, 0), width=3)
    atomic_write(output, lambda tmp: image.save(tmp, "PNG"))


def main(argv):
    del argv
    if not FLAGS.model:
        raise app.UsageError("--model is required")
    try:
        top = [int(k) for k in FLAGS.top]
    except ValueError:
        raise app.UsageError(f"--top must be integers, got {FLAGS.top}")
    import keras
    import numpy as np
    from PIL import Image

    from deep_retrieval.data import pipeline, synthetic
    from deep_retrieval.model.descriptor_model import image_size_of  # also registers the classes
    from deep_retrieval.retrieval import extraction

    if FLAGS.boxes:
        paths, boxes = load_boxes(FLAGS.boxes, FLAGS.images_dir)
    else:
        root = synthetic.ensure_dataset(progress=FLAGS.progress)
        paths, boxes = load_boxes(os.path.join(root, synthetic.DATASET_NAME, "boxes.csv"))
    if not os.path.isfile(FLAGS.model):
        raise ValueError(f"{FLAGS.model}: no such model file")
    model = keras.models.load_model(FLAGS.model)
    size = image_size_of(model, FLAGS.image_size)
    chosen = 0
    if FLAGS.image:
        names = [os.path.basename(p) for p in paths]
        if FLAGS.image not in names and FLAGS.image + ".jpg" not in names:
            print(f"error: --image {FLAGS.image} is not in the box list", file=sys.stderr)
            return 1
        chosen = names.index(FLAGS.image if FLAGS.image in names else FLAGS.image + ".jpg")
    image = next(iter(pipeline.image_dataset([paths[chosen]], size)))[1][0].numpy()[None]
    with Image.open(paths[chosen]) as im:
        width, height = im.size
    to_original = np.array([width / image.shape[2], height / image.shape[1]] * 2)
    regions = model.pooled_regions(image)[0][: FLAGS.draw] * to_original
    output = FLAGS.output or os.path.join(os.path.dirname(os.path.abspath(FLAGS.model)), "proposals.png")
    draw(paths[chosen], regions, boxes[chosen], output)
    print(f"wrote {output}: {os.path.basename(paths[chosen])} with its top "
          f"{len(regions)} {model.config.regions} regions")
    n = FLAGS.limit or len(paths)
    result = extraction.proposal_recall(model, paths[:n], boxes[:n], size, top, FLAGS.iou, FLAGS.progress)
    print(f"box recall at IoU >= {FLAGS.iou:g} over {result['images']} images:")
    for key, value in result.items():
        if "@" in key:
            label = f"grid ({result['grid_regions']} regions)" if key == "grid@all" else key
            print(f"  {label:24} {100 * value:6.1f} %")
    if FLAGS.output_json:
        atomic_text(FLAGS.output_json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
