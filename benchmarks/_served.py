"""What the serving benchmarks share: a descriptor model with random weights
exported as version 1, and the embedded server on a free loopback port in
its own process (imported by the benchmark scripts beside it)."""

import contextlib
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_random_model(work, backbone="tiny", image_size=256, whitening_dim=128):
    """Builds, saves and exports a random-weight model under ``work``;
    returns the model base path (holding version ``1``)."""
    from deep_retrieval.config import DescriptorConfig
    from deep_retrieval.model.descriptor_model import build_descriptor_model
    from export import export_saved_model

    model = build_descriptor_model(DescriptorConfig(backbone=backbone, weights=None, whitening_dim=whitening_dim),
                                   image_size)
    model.save(os.path.join(work, "model.keras"))
    base = os.path.join(work, "models", "deep_retrieval")
    export_saved_model.export(os.path.join(work, "model.keras"), os.path.join(base, "1"))
    return base


def free_port():
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_server(base, ready_timeout=180, rest_api_port=None):
    """``python -m serving.server`` over ``base`` (with its REST API on
    ``rest_api_port`` if given): yields ``(address, process)`` once it
    answers, and stops it afterwards."""
    import grpc

    port = free_port()
    rest = [f"--rest_api_port={rest_api_port}"] if rest_api_port else []
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.server", f"--port={port}", "--model_name=deep_retrieval",
         f"--model_base_path={base}", "--file_system_poll_wait_seconds=0", *rest],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=ready_timeout)
        yield address, server
    finally:
        server.terminate()
        server.wait(60)
