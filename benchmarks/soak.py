"""A bounded soak of the embedded server with hostile requests mixed in.

Exports a descriptor model (random weights), starts `python -m serving.server`
in its own process on a free loopback port, and runs `load_test`
twice for the same time, side by side: normal clients alone, then the same
clients with ``--hostile`` clients sending `load_test.hostile_requests`
(declared-shape amplification, bombs in every format, many sub-cap images,
JPEG XL, empty images, heavy requests abandoned at once) and holding silent
TCP connections, plus one hostile client on the server's REST API
(`load_test.hostile_rest_requests`) and one on a search page
(`python -m serving.web` over an index of the images, describing queries
with the SavedModel in its own process: `load_test.hostile_web_requests`).
Prints the normal requests' latency percentiles and errors, how each
hostile request was answered, the server's resident memory over time, the
page's peak, and whether the server is still alive.

    python benchmarks/soak.py [--seconds 300] [--clients 4] [--hostile 2] [--backbone tiny]
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")



def _print(title, result):
    print(f"\n== {title}")
    for key in ("requests", "ok", "errors", "first_errors", "requests_per_s", "p50_ms", "p90_ms", "p99_ms",
                "rss_start_mb", "rss_peak_mb", "rss_end_mb", "rss_growth_after_warmup_mb", "rss_timeline_mb",
                "web_rss_peak_mb", "server_alive"):
        if key in result:
            print(f"{key:28} {result[key]}")
    for name, codes in result.get("hostile_answers", {}).items():
        print(f"  hostile: {name:34} {codes}")


@contextlib.contextmanager
def search_page(address, base, work, blobs):
    """`serving.web` over an exact index of ``blobs`` (described through the
    server at ``address``), its queries described in process by the
    SavedModel: yields ``(port, process)``."""
    import http.client

    import numpy as np
    from _served import ROOT, free_port

    from deep_retrieval.retrieval.index import Index
    from serving import client

    stub = client.prediction_stub(address)
    vectors = client.descriptors(stub.Predict(client.predict_request("deep_retrieval", blobs), timeout=120))
    index = Index(vectors.shape[1])
    index.add(np.asarray(vectors), [f"{i}.jpg" for i in range(len(blobs))])
    index.save(os.path.join(work, "index"))
    port = free_port()
    page = subprocess.Popen([sys.executable, "-m", "serving.web", f"--index={work}/index",
                             f"--saved_model={base}/1", f"--port={port}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/")
                connection.getresponse().read()
                break
            except OSError:
                time.sleep(0.5)
        yield port, page
    finally:
        page.terminate()
        page.wait(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300, help="Length of each of the two runs.")
    parser.add_argument("--clients", type=int, default=4, help="Normal clients (one image per request).")
    parser.add_argument("--hostile", type=int, default=2, help="Hostile clients in the second run.")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args()

    import load_test
    from _served import embedded_server, export_random_model, free_port

    work = tempfile.mkdtemp(prefix="soak_")
    base = export_random_model(work, args.backbone, args.image_size)
    rest_port = free_port()
    with embedded_server(base, rest_api_port=rest_port) as (address, server):
        blobs = load_test.generated_images()
        load_test.run(address, "deep_retrieval", blobs, clients=2, requests=20, duration=60)  # warm-up
        with search_page(address, base, work, blobs) as (web_port, page):
            http_targets = [(rest_port, load_test.hostile_rest_requests("deep_retrieval", blobs[0])),
                            (web_port, load_test.hostile_web_requests(blobs[0], load_test.large_jpeg()))]
            for title, hostile in (("normal clients alone", 0),
                                   (f"with {args.hostile} hostile gRPC clients, one on REST, one on the page",
                                    args.hostile)):
                result = load_test.run(address, "deep_retrieval", blobs, clients=args.clients, requests=10**9,
                                       duration=args.seconds, server_pid=server.pid, hostile_clients=hostile,
                                       http_targets=http_targets if hostile else (),
                                       watch_pids={"web": page.pid})
                _print(title, result)
            print(f"\npage exit code so far: {page.poll()} (None: still running)")
        print(f"server exit code so far: {server.poll()} (None: still running)")


if __name__ == "__main__":
    main()
