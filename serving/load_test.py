r"""A bounded load test of a PredictionService (the embedded server or TF Serving).

    python -m serving.load_test --server 127.0.0.1:8500 --clients 8 \
        --requests 2000 --duration 120 [--server_pid PID] [--images photos/]

Several client threads, each with its own channel, send Predict requests of
``--batch`` encoded images until ``--requests`` requests in total have been
sent or ``--duration`` seconds have passed, whichever comes first; it stops
by itself. Prints requests/s, latency p50/p90/p99, the number of errors and,
with ``--server_pid`` (a server on this machine), the server's resident
memory sampled over the run. Loopback only: ``--server`` must be a local
address unless ``--allow_remote``.
"""

import sys
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of the server.")
    flags.DEFINE_string("model_name", "deep_retrieval", "ModelSpec.name.")
    flags.DEFINE_integer("clients", 8, "Concurrent clients.")
    flags.DEFINE_integer("requests", 2000, "Requests in total (the test stops after them).")
    flags.DEFINE_float("duration", 120.0, "Seconds at most (the test stops after them).")
    flags.DEFINE_integer("batch", 1, "Images per request.")
    flags.DEFINE_string("images", None, "Folder of images sent in turn (default: generated 320x240 JPEGs).")
    flags.DEFINE_integer("server_pid", None, "PID of a local server whose memory is sampled.")
    flags.DEFINE_boolean("allow_remote", False, "Allow a non-loopback --server.")


def rss_mb(pid):
    """Resident memory of a local process in MiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def generated_images(count=8, size=(320, 240)):
    """Encoded JPEGs of random smooth pictures (no files needed)."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for i in range(count):
        small = np.random.RandomState(i).randint(0, 256, (size[1] // 16, size[0] // 16, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(address, model_name, blobs, clients=8, requests=2000, duration=120.0, batch=1, server_pid=None,
        timeout=60.0):
    """Runs the load; returns a dict of figures (latencies in ms, memory in MiB)."""
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    lock = threading.Lock()
    issued = [0]
    latencies, errors = [], []
    deadline = time.time() + duration
    payloads = []
    for i in range(len(blobs)):
        items = [blobs[(i + k) % len(blobs)] for k in range(batch)]
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(items, dtype=tf.string, shape=[batch]))
        payloads.append(request)

    def client(seed):
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20),
                                                          ("grpc.max_receive_message_length", 256 << 20)])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        n = seed
        while time.time() < deadline:
            with lock:
                if issued[0] >= requests:
                    break
                issued[0] += 1
            start = time.perf_counter()
            try:
                stub.Predict(payloads[n % len(payloads)], timeout=timeout)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{e.code().name}: {e.details()}")
            n += 1
        channel.close()

    memory, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            value = rss_mb(server_pid)
            if value is not None:
                memory.append((time.time(), value))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True) if server_pid else None
    if sampler:
        sampler.start()
    start = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.time() - start
    stop.set()
    if sampler:
        sampler.join()
    lat = np.asarray(latencies) * 1000
    result = {
        "clients": clients, "batch": batch, "requests": len(latencies) + len(errors),
        "ok": len(latencies), "errors": len(errors), "first_errors": errors[:3],
        "seconds": round(seconds, 2), "requests_per_s": round(len(latencies) / seconds, 2),
        "images_per_s": round(len(latencies) * batch / seconds, 2),
    }
    if len(lat):
        result.update({f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 90, 99)})
    if memory:
        values = [v for _, v in memory]
        tenth = max(1, len(values) // 10)
        result.update(rss_samples=len(values), rss_start_mb=round(values[0], 1), rss_peak_mb=round(max(values), 1),
                      rss_end_mb=round(values[-1], 1),
                      rss_growth_after_warmup_mb=round(float(np.mean(values[-tenth:]) - np.mean(values[:tenth])), 1))
    return result


def main(argv):
    del argv
    host = FLAGS.server.rsplit(":", 1)[0]
    if not FLAGS.allow_remote and host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        raise app.UsageError(f"--server {FLAGS.server} is not a loopback address; pass --allow_remote")
    if FLAGS.images:
        from serving import extract

        blobs = []
        for _, path in extract.list_images(FLAGS.images)[:64]:
            with open(path, "rb") as f:
                blobs.append(f.read())
        if not blobs:
            print(f"error: no image under {FLAGS.images}", file=sys.stderr)
            return 1
    else:
        blobs = generated_images()
    result = run(FLAGS.server, FLAGS.model_name, blobs, FLAGS.clients, FLAGS.requests, FLAGS.duration,
                 FLAGS.batch, FLAGS.server_pid)
    for key, value in result.items():
        print(f"{key:28} {value}")
    return 0 if result["errors"] == 0 else 2


if __name__ == "__main__":
    define_flags()
    app.run(main)
