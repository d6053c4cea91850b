"""gRPC serving throughput versus in-process extraction, same images, same run.

Exports a demo-sized descriptor model (random weights), starts the embedded
server (`python -m serving.server`) in its own process on a free loopback
port, and times:

* in-process: the SavedModel's ``serving_default`` signature called directly
  on batches of encoded images;
* gRPC: the extraction client (`serving.extract`) sending the same batches
  with several requests in flight.

    python benchmarks/serving_throughput.py [--images 256] [--batch_size 16] [--in_flight 4]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--in_flight", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--backbone", default="tiny")
    args = parser.parse_args()

    import tensorflow as tf
    from _served import embedded_server, export_random_model

    from deep_retrieval.retrieval import image_lists
    from serving import batch_client

    work = tempfile.mkdtemp(prefix="serving_bench_")
    base = export_random_model(work, args.backbone, args.image_size)

    rng = np.random.default_rng(0)
    folder = os.path.join(work, "images")
    os.makedirs(folder)
    for i in range(args.images):
        h, w = (240, 320) if i % 2 else (320, 240)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    items, _ = image_lists.list_images(folder)
    blobs = [open(p, "rb").read() for _, p in items]
    batches = [blobs[i:i + args.batch_size] for i in range(0, len(blobs), args.batch_size)]

    signature = tf.saved_model.load(os.path.join(base, "1")).signatures["serving_default"]
    signature(images=tf.constant(batches[0]))  # warm-up
    t0 = time.perf_counter()
    for batch in batches:
        signature(images=tf.constant(batch))["descriptors"].numpy()
    in_process = len(blobs) / (time.perf_counter() - t0)
    print(f"in-process: {in_process:.1f} images/s", flush=True)

    with embedded_server(base) as (address, _):
        replicas = batch_client.Replicas([address], 256 << 20)
        extractor = batch_client.Extractor(replicas, "deep_retrieval", "serving_default", 300, 3)
        extractor.run(list(zip(["w"] * len(batches[0]), batches[0])))  # warm-up
        out = os.path.join(work, "out.parquet")
        t0 = time.perf_counter()
        count, failed = batch_client.extract(items, out, extractor, args.batch_size, 64 << 20,
                                            args.in_flight, chunk_size=len(items), progress=False)
        grpc_rate = count / (time.perf_counter() - t0)
    assert failed == 0
    print(f"gRPC (embedded server, {args.in_flight} in flight, batch {args.batch_size}): {grpc_rate:.1f} images/s")
    print(f"ratio gRPC / in-process: {grpc_rate / in_process:.2f}")


if __name__ == "__main__":
    main()
