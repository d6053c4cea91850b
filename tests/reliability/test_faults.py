"""kill -9 in the middle of training, extraction and index building, and a
server restarted under a running client: nothing corrupt, nothing lost."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import tensorflow as tf

from benchmarks._served import free_port
from deep_retrieval.retrieval import index as index_lib
from tests.helpers_images import encoded
from tests.helpers_training import SMALL_TRAINING

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT}



def _python(*args):
    return [sys.executable, "-m", *args]


def _wait_for(condition, process, timeout=300, what="condition"):
    start = time.time()
    while not condition():
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}: {out[-3000:]}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(process):
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _backup_steps(folder):
    """The steps of the backups in ``folder`` (one mining round a step here),
    and the one ``latest`` names."""
    steps = sorted(int(name.split("-")[1]) for name in os.listdir(folder)
                   if re.fullmatch(r"round-\d+", name)) if os.path.isdir(folder) else []
    latest = None
    if os.path.exists(os.path.join(folder, "latest")):
        latest = int(open(os.path.join(folder, "latest")).read().split("-")[1])
    return steps, latest


def test_kill_during_training_then_resume(tmp_path):
    import keras

    import deep_retrieval.model  # noqa: F401 (registers the classes model.keras names)

    out = str(tmp_path / "run")
    backups = os.path.join(out, "checkpoints")
    args = [*SMALL_TRAINING, "--mine_every", "1", "--checkpoint_every", "1"]
    first = subprocess.Popen(_python("training.train", "--output_dir", out, "--steps", "1000", *args),
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (_backup_steps(backups)[1] or 0) >= 3, first, what="step 3")
    _kill(first)
    steps, latest = _backup_steps(backups)
    assert latest >= 3 and latest in steps
    for step in steps:  # every complete backup loads: weights, and the epoch fit resumes at
        folder = os.path.join(backups, f"round-{step:06d}")
        assert json.load(open(os.path.join(folder, "training_metadata.json")))["epoch"] == step
        with h5py.File(os.path.join(folder, "latest.weights.h5")) as f:
            assert len(f.keys())
    second = subprocess.run(_python("training.train", "--output_dir", out, "--steps", str(latest + 2), "--resume",
                                    *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"round-{latest:06d} at step {latest}" in second.stdout + second.stderr
    assert _backup_steps(backups)[1] == latest + 2
    assert keras.models.load_model(os.path.join(out, "model.keras")).image_size == 64


def _photos(folder, count):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        with open(os.path.join(folder, f"img{i:03d}.jpg"), "wb") as f:
            f.write(encoded(60 + i % 7, 80, i))
    return sorted(f"img{i:03d}.jpg" for i in range(count))


def _parts(output):
    folder = output + ".parts"
    return [f for f in os.listdir(folder) if f.endswith(".parquet")] if os.path.isdir(folder) else []


def test_kill_during_extraction_then_rerun(address, tmp_path):
    names = _photos(str(tmp_path / "photos"), 48)
    output = str(tmp_path / "d.parquet")
    command = _python("serving.extract", "--server", address, "--images", str(tmp_path / "photos"),
                      "--output", output, "--batch_size", "2", "--chunk_size", "4", "--in_flight", "1",
                      "--noprogress")
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(_parts(output)) >= 2, first, what="two committed chunks")
    _kill(first)
    assert not os.path.exists(output)
    second = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    frame = pd.read_parquet(output)
    assert frame["image"].tolist() == names  # every image exactly once, in order


def _descriptors(path, count, dim, seed):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    pd.DataFrame({"image": [f"{seed}-{i}" for i in range(count)], "descriptor": list(vectors)}).to_parquet(path)


def test_kill_during_index_building(tmp_path):
    small, big = str(tmp_path / "small.parquet"), str(tmp_path / "big.parquet")
    _descriptors(small, 50, 64, 1)
    _descriptors(big, 150_000, 64, 2)
    output = str(tmp_path / "index")
    build = lambda src: _python("serving.index", "--descriptors", src, "--output", output, "--kind", "exact")  # noqa: E731
    assert subprocess.run(build(small), cwd=ROOT, env=ENV, capture_output=True, timeout=300).returncode == 0
    outcomes = set()
    for delay in (0.5, 2.0, 4.0, 6.0, 8.0):
        process = subprocess.Popen(build(big), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if process.poll() is None:
            _kill(process)
        index = index_lib.Index.load(output)  # always loadable: the old index or the new one
        assert len(index) in (50, 150_000)
        outcomes.add(len(index))
        if len(index) == 150_000:
            assert index.ids[-1] == "2-149999"
            break
    assert 50 in outcomes  # at least one kill landed before the new index was in place


def test_index_survives_a_crash_between_the_two_renames(tmp_path):
    output = str(tmp_path / "index")
    first = index_lib.Index(4, kind="exact")
    first.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    first.save(output)
    os.replace(output, output + ".old")  # the state a kill between the renames leaves
    assert list(index_lib.Index.load(output).ids) == ["a", "b", "c", "d"]
    second = index_lib.Index(4, kind="exact")
    second.add(np.eye(4, dtype=np.float32)[:2], ["e", "f"])
    second.save(output)
    assert list(index_lib.Index.load(output).ids) == ["e", "f"] and not os.path.exists(output + ".old")


def _start_server(base, port):
    return subprocess.Popen(
        _python("serving.server", "--port", str(port), "--model_name", "deep_retrieval",
                "--model_base_path", base),
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_server_restarted_under_a_running_client(exported, tmp_path):
    names = _photos(str(tmp_path / "photos"), 60)
    port = free_port()
    server = _start_server(exported["base"], port)
    output = str(tmp_path / "d.parquet")
    client = subprocess.Popen(
        _python("serving.extract", "--server", f"127.0.0.1:{port}", "--images", str(tmp_path / "photos"),
                "--output", output, "--batch_size", "2", "--chunk_size", "4", "--in_flight", "1",
                "--retries", "12", "--noprogress"),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(_parts(output)) >= 2, client, what="two committed chunks")
        _kill(server)
        time.sleep(1.0)
        server = _start_server(exported["base"], port)
        out, _ = client.communicate(timeout=600)
        assert client.returncode == 0, out[-3000:]
    finally:
        server.kill()
        client.kill()
    frame = pd.read_parquet(output)
    assert frame["image"].tolist() == names


def test_sigterm_drains_requests_in_flight_and_exits_0(exported):
    import threading

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    port = free_port()
    server = subprocess.Popen(
        _python("serving.server", "--port", str(port), "--model_name", "deep_retrieval",
                "--model_base_path", exported["base"]),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def request(count):
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "deep_retrieval"
        blobs = [encoded(240, 320, i) for i in range(count)]
        r.inputs["images"].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string, shape=[count]))
        return r

    try:
        deadline = time.time() + 180
        while True:  # until it serves
            try:
                stub.Predict(request(1), timeout=30)
                break
            except grpc.RpcError:
                assert time.time() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.5)
        result = {}

        def slow():
            try:
                result["shape"] = stub.Predict(request(96), timeout=120).outputs["descriptors"].tensor_shape
            except grpc.RpcError as e:
                result["error"] = e.code()

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.5)  # the big request is in flight
        server.send_signal(signal.SIGTERM)
        thread.join(timeout=150)
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    assert "error" not in result, result
    assert result["shape"].dim[0].size == 96
    assert server.returncode == 0 and "draining" in out
