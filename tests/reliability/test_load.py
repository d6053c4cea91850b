"""The load test in a short form: a server process under concurrent clients."""

import time

from benchmarks import load_test
from benchmarks._served import free_port
from tests.reliability.test_faults import _start_server


def test_concurrent_clients_no_errors_flat_memory(exported):
    port = free_port()
    server = _start_server(exported["base"], port)
    address = f"127.0.0.1:{port}"
    try:
        blobs = load_test.generated_images(4, (160, 120))
        # Warm up: the server process imports TensorFlow and loads the model.
        deadline = time.time() + 180
        while True:
            warm = load_test.run(address, "deep_retrieval", blobs, clients=1, requests=1, duration=60, timeout=10)
            if warm["ok"] or time.time() > deadline:
                break
            time.sleep(0.5)
        assert warm["ok"] == 1, warm
        result = load_test.run(address, "deep_retrieval", blobs, clients=4, requests=160, duration=240,
                               batch=2, server_pid=server.pid)
    finally:
        server.kill()
        server.wait()
    assert result["errors"] == 0, result["first_errors"]
    assert result["ok"] == 160 and result["requests_per_s"] > 0
    assert result["p50_ms"] <= result["p99_ms"]
    # Memory is sampled every 160 / 20 answers whatever the machine's speed, besides the timer's samples.
    assert result["rss_samples"] >= load_test.RSS_CHECKPOINTS
    # After warm-up the server's memory stays flat (a leak of even 1 MB a
    # request would add 160 MB here).
    assert result["rss_growth_after_warmup_mb"] < 64, result
