"""The SavedModel's ``serving_default`` on requests of 1, 8 and 32 same-size
encoded photos: images/s, and descriptors equal to one-image requests.

The graph groups a request's images by the shapes of their views and runs
each group as one network batch (`export.descriptor_module`), so larger
requests of same-size photos amortise the per-call cost. Random weights
(speed only), exported to a temporary folder, TensorFlow backend.

    python benchmarks/serving_graph.py [--backbone efficientnet_lite0] [--image_size 640] \\
        [--width 640 --height 480] [--scales 1,0.7071,1.4142] [--repeats 3]
"""

import argparse
import io
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model  # noqa: E402
from export import export_saved_model  # noqa: E402


def _photos(count, width, height):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        pixels = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image_size", type=int, default=640)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--scales", default="1,0.7071,1.4142")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scales = tuple(float(s) for s in args.scales.split(","))
    model = build_descriptor_model(DescriptorConfig(backbone=args.backbone, weights=None, scales=scales,
                                                    whitening_dim=None), args.image_size)
    folder = tempfile.mkdtemp(prefix="serving_graph_")
    model.save(os.path.join(folder, "model.keras"))
    export_saved_model.export(os.path.join(folder, "model.keras"), os.path.join(folder, "1"))
    serve = tf.saved_model.load(os.path.join(folder, "1")).signatures["serving_default"]
    batches = [int(b) for b in args.batches.split(",")]
    blobs = _photos(max(batches), args.width, args.height)
    single = np.concatenate([serve(images=tf.constant([b]))["descriptors"].numpy() for b in blobs])
    print(f"{args.backbone}, {args.width}x{args.height} JPEGs, image_size {args.image_size}, scales {scales}")
    for batch in batches:
        request = tf.constant(blobs[:batch])
        out = serve(images=request)["descriptors"].numpy()  # warm-up (and the equality check)
        diff = float(np.abs(out - single[:batch]).max())
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            serve(images=request)["descriptors"].numpy()
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"request of {batch:3d} image(s): {batch / best:6.2f} img/s ({best:.2f} s per request; "
              f"max |difference| to one-image requests {diff:.1e})", flush=True)


if __name__ == "__main__":
    main()
