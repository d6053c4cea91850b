r"""A bounded load test of a PredictionService (the embedded server or TF Serving).

    python benchmarks/load_test.py --server 127.0.0.1:8500 --clients 8 \
        --requests 2000 --duration 120 [--server_pid PID] [--images photos/]

Several client threads, each with its own channel, send Predict requests of
``--batch`` encoded images until ``--requests`` requests in total have been
sent or ``--duration`` seconds have passed, whichever comes first; it stops
by itself. Prints requests/s, latency p50/p90/p99, the number of errors and,
with ``--server_pid`` (a server on this machine), the server's resident
memory sampled over the run and whether it is still alive. Loopback only:
``--server`` must be a local address unless ``--allow_remote``.

``--hostile_clients`` adds clients that send, in turn, the requests a
hostile client or a bad day sends (`hostile_requests`: declared-shape
amplification, decompression bombs in every format, many sub-cap images,
JPEG XL, empty images, heavy requests abandoned at once) and hold silent
TCP connections; the normal clients' figures are reported apart, with how
the hostile requests were answered. `run`'s ``http_targets`` add clients
that send `hostile_rest_requests` to the REST API and `hostile_web_requests`
to the search page (amplifying JSON, values out of range, bad lengths,
degenerate boxes, bodies that never come, a rebinding ``Host``, thousands of
form parts, large uploads).
"""

import sys
import threading
import time

from absl import app, flags

from deep_retrieval import cli

FLAGS = flags.FLAGS
RSS_CHECKPOINTS = 20  # server memory samples spread over the requests, beside the 4-a-second ones


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
    flags.DEFINE_integer("hostile_clients", 0, "Clients sending hostile requests alongside the normal ones.")
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


def _declaring(kind, width, height):
    """A tiny image whose header is patched to declare ``width x height``."""
    import io
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, kind, **({"lossless": True} if kind == "WEBP" else {}))
    data = bytearray(buf.getvalue())
    if kind == "JPEG":
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    elif kind == "PNG":  # IHDR's sizes, then its CRC
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    else:  # lossless WebP: two 14-bit sizes minus one
        packed = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
        data[21:25] = (packed | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


def _gif_frames(side, frames):
    """A GIF of ``frames`` complete one-colour ``side x side`` frames."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (side, side), 0).save(buf, "GIF")
    data = buf.getvalue()
    start = data.index(b"\x2c", 13 + 3 * 2 ** ((data[10] & 7) + 1))  # Pillow writes no extension first
    return data[:start] + data[start:-1] * frames + data[-1:]


def hostile_requests(model_name, blob):
    """``[(name, request, timeout)]``: what a hostile client sends (each
    must be refused or cut short, none may hurt the server)."""
    import numpy as np
    import tensorflow as tf

    from serving import client

    def request(tensor, signature="serving_default"):
        return client.predict_request(model_name, signature_name=signature, tensor=tensor)

    def strings(items):
        return tf.make_tensor_proto(items, dtype=tf.string, shape=[len(items)])

    amplified = strings([blob])
    amplified.tensor_shape.dim[0].size = 5000
    empty_pixels = tf.make_tensor_proto(np.zeros((1, 1, 1, 3), np.uint8))
    empty_pixels.tensor_content = b""
    for dim, size in zip(empty_pixels.tensor_shape.dim, (1, 12000, 12000, 3)):
        dim.size = size
    return [
        ("shape amplification (images)", request(amplified), 10),
        ("shape amplification (pixels)", request(empty_pixels, "pixels"), 10),
        ("PNG bomb", request(strings([_declaring("PNG", 50000, 50000)])), 10),
        ("JPEG bomb", request(strings([_declaring("JPEG", 60000, 60000)])), 10),
        ("WebP bomb", request(strings([_declaring("WEBP", 16383, 16383)])), 10),
        ("GIF frames bomb", request(strings([_gif_frames(3000, 60)])), 10),
        ("16 sub-cap JPEGs", request(strings([_declaring("JPEG", 9459, 9459)] * 16)), 10),
        ("JPEG XL", request(strings([b"\xff\x0a" + bytes(60)])), 10),
        ("0x0 pixels", request(tf.make_tensor_proto(np.zeros((1, 0, 0, 3), np.uint8)), "pixels"), 10),
        ("256 images abandoned after 50 ms", request(strings([blob] * 256)), 0.05),
    ]


def hostile_rest_requests(model_name, blob):
    """``[(name, path, body, headers, timeout)]`` for the REST API."""
    import base64
    import json

    predict = f"/v1/models/{model_name}:predict"
    b64 = {"b64": base64.b64encode(blob).decode()}

    def body(payload):
        return json.dumps(payload).encode()

    return [
        ("REST 16 MiB of empty lists", predict, b'{"instances":[' + b"[]," * ((16 << 20) // 3) + b"[]]}", {}, 30),
        ("REST nesting 100000 deep", predict, b'{"instances":' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 30),
        ("REST pixel 300", predict, body({"signature_name": "pixels", "instances": [[[[300, 0, 0]]]]}), {}, 30),
        ("REST pixel 1e300", predict, b'{"signature_name":"pixels","instances":[[[[1e300,0,0]]]]}', {}, 30),
        ("REST Content-Length ²", predict, b"", {"Content-Length": "²"}, 30),
        ("REST reversed box", predict, body({"signature_name": "crops",
                                             "instances": [{"images": b64, "boxes": [50, 40, 10, 5]}]}), {}, 30),
        ("REST 300 images", predict, body({"instances": [b64] * 300}), {}, 30),
        ("REST 64 MiB declared, never sent", predict, b"", {"Content-Length": str(64 << 20)}, 2),
        ("REST rebinding Host", f"/v1/models/{model_name}", None, {"Host": "attacker.example"}, 30),
    ]


def _multipart(fields, boundary="soakboundary"):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def large_jpeg(side=9000):
    """A ``side`` x ``side`` JPEG of a flat colour (a few MB to decode per
    row, 1.2 GB of float pixels in all, a megabyte on the wire)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def hostile_web_requests(blob, large):
    """``[(name, path, body, headers, timeout)]`` for the search page
    (`serving.web`); ``large`` is `large_jpeg`'s image."""
    parts, kind = _multipart([("x", b"")] * 50_000)
    upload, upload_kind = _multipart([("image", large)])
    box, box_kind = _multipart([("image", blob), ("box", b"30,30,10,10")])
    return [
        ("web 50000 empty parts", "/api/search", parts, {"Content-Type": kind}, 30),
        ("web 9000x9000 upload", "/api/search", upload, {"Content-Type": upload_kind}, 120),
        ("web reversed box", "/api/search", box, {"Content-Type": box_kind}, 30),
        ("web 32 MiB declared, never sent", "/api/search", b"", {"Content-Length": str(32 << 20),
                                                                   "Content-Type": kind}, 2),
        ("web rebinding Host", "/", None, {"Host": "attacker.example"}, 30),
    ]


def _http_answer(port, path, body, headers, limit):
    """The status code of one HTTP request, or why there was none."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=limit)
    try:
        connection.putrequest("GET" if body is None else "POST", path, skip_host="Host" in headers)
        for key, value in headers.items():
            connection.putheader(key, value)
        if body is not None and "Content-Length" not in headers:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        if body:
            connection.send(body)
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except TimeoutError:
        return "timeout (ours)"
    except (OSError, http.client.HTTPException) as e:
        return f"no answer: {type(e).__name__}"
    finally:
        connection.close()


def run(address, model_name, blobs, clients=8, requests=2000, duration=120.0, batch=1, server_pid=None,
        timeout=60.0, hostile_clients=0, http_targets=(), watch_pids=None):
    """Runs the load; returns a dict of figures (latencies in ms, memory in MiB).

    With ``server_pid`` the server's RSS is sampled four times a second and
    after every ``requests / RSS_CHECKPOINTS`` answers, so a slow machine
    still gets a timeline. ``http_targets``: ``[(port, requests)]``, one
    hostile HTTP client each, sending ``requests`` (`hostile_rest_requests`,
    `hostile_web_requests`) in turn; ``watch_pids``: ``{name: pid}`` of
    further processes whose peak RSS is reported.
    """
    import grpc
    import numpy as np
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving import client

    lock = threading.Lock()
    issued = [0]
    every = max(1, requests // RSS_CHECKPOINTS)  # memory is also sampled per completed requests, whatever the speed
    latencies, errors = [], []
    deadline = time.time() + duration
    payloads = [client.predict_request(model_name, [blobs[(i + k) % len(blobs)] for k in range(batch)])
                for i in range(len(blobs))]

    def normal(seed):
        channel = client.channel(address)
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
                    checkpoint = server_pid and len(latencies) % every == 0
                if checkpoint:
                    record_rss()
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{e.code().name}: {e.details()}")
            n += 1
        channel.close()

    hostile = hostile_requests(model_name, blobs[0]) if hostile_clients else []
    answers = {}

    def attacker(seed):
        import socket

        channel = client.channel(address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        host, port = address.rsplit(":", 1)
        silent = []
        n = seed
        while time.time() < deadline and not finished.is_set():
            name, request, limit = hostile[n % len(hostile)]
            try:
                silent.append(socket.create_connection((host.strip("[]"), int(port)), timeout=5))
            except OSError:
                pass
            try:
                stub.Predict(request, timeout=limit)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                answers.setdefault(name, {}).setdefault(code, 0)
                answers[name][code] += 1
            n += 1
            if len(silent) > 50:
                silent.pop(0).close()
        for sock in silent:
            sock.close()
        channel.close()

    def http_attacker(port, targets):
        n = 0
        while time.time() < deadline and not finished.is_set():
            name, path, body, headers, limit = targets[n % len(targets)]
            code = _http_answer(port, path, body, headers, limit)
            with lock:
                answers.setdefault(name, {}).setdefault(code, 0)
                answers[name][code] += 1
            n += 1

    memory, stop, finished = [], threading.Event(), threading.Event()
    peaks = dict.fromkeys(watch_pids or {}, 0.0)

    def record_rss():
        value = rss_mb(server_pid)
        if value is not None:
            with lock:
                memory.append((time.time(), value))

    def sample():
        while not stop.is_set():
            if server_pid:
                record_rss()
            for name, pid in (watch_pids or {}).items():
                peaks[name] = max(peaks[name], rss_mb(pid) or 0.0)
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True) if server_pid or watch_pids else None
    if sampler:
        sampler.start()
    start = time.time()
    threads = [threading.Thread(target=normal, args=(i,)) for i in range(clients)]
    attackers = [threading.Thread(target=attacker, args=(i,)) for i in range(hostile_clients)]
    attackers += [threading.Thread(target=http_attacker, args=target) for target in http_targets]
    for t in threads + attackers:
        t.start()
    for t in threads:
        t.join()
    seconds = time.time() - start
    finished.set()
    for t in attackers:
        t.join()
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
    if hostile_clients or http_targets:
        result["hostile_answers"] = answers
    for name, peak in peaks.items():
        result[f"{name}_rss_peak_mb"] = round(peak, 1)
    if server_pid:
        result["server_alive"] = rss_mb(server_pid) is not None
    if memory:
        values = [v for _, v in sorted(memory)]
        tenth = max(1, len(values) // 10)
        timeline = [round(values[min(len(values) - 1, i * len(values) // 10)]) for i in range(10)] + [round(values[-1])]
        result.update(rss_samples=len(values), rss_start_mb=round(values[0], 1), rss_peak_mb=round(max(values), 1),
                      rss_timeline_mb=timeline,
                      rss_end_mb=round(values[-1], 1),
                      rss_growth_after_warmup_mb=round(float(np.mean(values[-tenth:]) - np.mean(values[:tenth])), 1))
    return result


def main(argv):
    del argv
    host = FLAGS.server.rsplit(":", 1)[0]
    if not FLAGS.allow_remote and host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        raise app.UsageError(f"--server {FLAGS.server} is not a loopback address; pass --allow_remote")
    if FLAGS.images:
        from deep_retrieval.retrieval import image_lists

        try:
            items, _ = image_lists.list_images(FLAGS.images)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        blobs = []
        for _, path in items[:64]:
            with open(path, "rb") as f:
                blobs.append(f.read())
    else:
        blobs = generated_images()
    result = run(FLAGS.server, FLAGS.model_name, blobs, FLAGS.clients, FLAGS.requests, FLAGS.duration,
                 FLAGS.batch, FLAGS.server_pid, hostile_clients=FLAGS.hostile_clients)
    for key, value in result.items():
        if key == "hostile_answers":
            for name, codes in value.items():
                print(f"  hostile: {name:34} {codes}")
        else:
            print(f"{key:28} {value}")
    return 0 if result["errors"] == 0 and result.get("server_alive", True) else 2


if __name__ == "__main__":
    define_flags()
    cli.run(main)
