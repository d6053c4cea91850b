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
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")



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

    from _served import embedded_server, export_random_model

    from serving import load_test

    base = export_random_model(tempfile.mkdtemp(prefix="soak_"), args.backbone, args.image_size)
    with embedded_server(base) as (address, server):
        blobs = load_test.generated_images()
        load_test.run(address, "deep_retrieval", blobs, clients=2, requests=20, duration=60)  # warm-up
        for title, hostile in (("normal clients alone", 0), (f"with {args.hostile} hostile clients", args.hostile)):
            result = load_test.run(address, "deep_retrieval", blobs, clients=args.clients, requests=10**9,
                                   duration=args.seconds, server_pid=server.pid, hostile_clients=hostile)
            _print(title, result)
        print(f"\nserver exit code so far: {server.poll()} (None: still running)")


if __name__ == "__main__":
    main()
