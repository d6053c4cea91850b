"""A bounded soak of the embedded server with hostile requests mixed in.

Exports a descriptor model (random weights), starts `python -m serving.server`
in its own process on a free loopback port, and runs `serving.load_test`
twice for the same time, side by side: normal clients alone, then the same
clients with ``--hostile`` clients sending `serving.load_test.hostile_requests`
(declared-shape amplification, bombs in every format, many sub-cap images,
JPEG XL, empty images, heavy requests abandoned at once) and holding silent
TCP connections. Prints the normal requests' latency percentiles and errors,
how each hostile request was answered, the server's resident memory over
time, and whether it is still alive.

    python benchmarks/soak.py [--seconds 300] [--clients 4] [--hostile 2] [--backbone tiny]
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _print(title, result):
    print(f"\n== {title}")
    for key in ("requests", "ok", "errors", "first_errors", "requests_per_s", "p50_ms", "p90_ms", "p99_ms",
                "rss_start_mb", "rss_peak_mb", "rss_end_mb", "rss_growth_after_warmup_mb", "rss_timeline_mb",
                "server_alive"):
        if key in result:
            print(f"{key:28} {result[key]}")
    for name, codes in result.get("hostile_answers", {}).items():
        print(f"  hostile: {name:34} {codes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300, help="Length of each of the two runs.")
    parser.add_argument("--clients", type=int, default=4, help="Normal clients (one image per request).")
    parser.add_argument("--hostile", type=int, default=2, help="Hostile clients in the second run.")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args()

    import grpc

    from deep_retrieval.config import DescriptorConfig
    from deep_retrieval.model import build_descriptor_model
    from export import export_saved_model
    from serving import load_test

    work = tempfile.mkdtemp(prefix="soak_")
    model = build_descriptor_model(DescriptorConfig(backbone=args.backbone, weights=None, whitening_dim=128))
    model.save(os.path.join(work, "model.keras"))
    base = os.path.join(work, "models", "deep_retrieval")
    export_saved_model.export(os.path.join(work, "model.keras"), os.path.join(base, "1"), args.image_size)
    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.server", f"--port={port}", f"--model_base_path={base}",
         "--file_system_poll_wait_seconds=0"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=180)
        blobs = load_test.generated_images()
        load_test.run(address, "deep_retrieval", blobs, clients=2, requests=20, duration=60)  # warm-up
        for title, hostile in (("normal clients alone", 0), (f"with {args.hostile} hostile clients", args.hostile)):
            result = load_test.run(address, "deep_retrieval", blobs, clients=args.clients, requests=10**9,
                                   duration=args.seconds, server_pid=server.pid, hostile_clients=hostile)
            _print(title, result)
        print(f"\nserver exit code so far: {server.poll()} (None: still running)")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
