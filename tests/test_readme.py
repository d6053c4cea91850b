"""The README's tour, run as written: each command of "A tour, from training
to a search answer", in its order and with its flags, on the tiny preset
(a few training steps, small images) with its paths in a temporary folder
and free ports. A flag renamed or a step that stops working fails here."""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request

from benchmarks._served import free_port
from tests.helpers_training import SMALL_TRAINING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOUR = "## A tour, from training to a search answer"


def tour_commands():
    """The tour's commands as argument lists (``&`` last for one run in the background)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert TOUR in text, "the README lost its tour"
    block = text.split(TOUR, 1)[1].lstrip("\n").split("\n\n", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("    ")]


def _wait_for_http(url, process, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise AssertionError(f"{url}: the process ended ({process.returncode}): "
                                 f"{process.stderr.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, answer.read()
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_the_readme_tour_runs_as_written(tmp_path):
    grpc_port, rest_port, web_port = free_port(), free_port(), free_port()
    photos = tmp_path / "photos"
    places = {"runs/demo": str(tmp_path / "runs/demo"),
              "models/deep_retrieval": str(tmp_path / "models/deep_retrieval"),
              "photos/": str(photos) + "/", "descriptors.parquet": str(tmp_path / "descriptors.parquet"),
              "index/": str(tmp_path / "index") + "/", "q.jpg": None, "localhost:8500": f"localhost:{grpc_port}",
              "8501": str(rest_port)}
    keras_home = tmp_path / "keras_home"  # the tour's own built-in data
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_HOME": str(keras_home)}
    commands = tour_commands()
    assert [c[2] if c[0] == "python" else c[0] for c in commands] == [
        "training.train", "training.evaluate", "export.export_saved_model", "saved_model_cli", "serving.server",
        "serving.extract", "serving.index", "serving.search", "serving.web"]
    background = []
    try:
        for command in commands:
            detached = command[-1] == "&"
            command = [a for a in command if a != "&"]
            name = command[2] if command[0] == "python" else command[0]
            if name == "serving.extract":  # photos of the built-in data the training run generated
                made = sorted(glob.glob(str(keras_home / "datasets" / "deep_retrieval" / "*" / "synthetic" / "jpg"
                                            / "*.jpg")))
                assert len(made) >= 8, made
                photos.mkdir()
                for path in made[:8]:
                    shutil.copy(path, photos)
                places["q.jpg"] = str(photos / os.path.basename(made[0]))
            args = []
            for arg in command:
                for before, after in places.items():
                    if after is not None and arg.startswith(before):
                        arg = after + arg[len(before):]
                        break
                args.append(arg)
            if args[0] == "python":
                args[0] = sys.executable
            else:
                args[0] = shutil.which(args[0], path=os.path.dirname(sys.executable)) or args[0]
            if name == "training.train":
                args += SMALL_TRAINING + ["--steps", "2", "--mine_every", "2"]  # the last flag wins
            elif name == "training.evaluate":  # the tiny run's benchmark, not the demo's photos
                data_root, = glob.glob(str(keras_home / "datasets" / "deep_retrieval" / "*"))
                args += ["--data_root", data_root, "--dataset", "synthetic", "--noprogress"]
            elif name == "serving.server":
                args += ["--port", str(grpc_port)]
            elif name == "serving.web":
                args += ["--port", str(web_port)]
            if detached or name == "serving.web":
                process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE)
                background.append(process)
                if name == "serving.server":
                    status, _ = _wait_for_http(f"http://127.0.0.1:{rest_port}/v1/models/deep_retrieval", process)
                    assert status == 200
                else:
                    status, page = _wait_for_http(f"http://127.0.0.1:{web_port}/", process)
                    assert status == 200 and b"<html" in page.lower()
                continue
            result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, (name, result.stdout[-2000:], result.stderr[-3000:])
            if name == "training.train":
                assert os.path.isfile(tmp_path / "runs/demo/model.keras")
            elif name == "training.evaluate":
                assert "medium" in result.stdout.lower(), result.stdout[-2000:]
            elif name == "saved_model_cli":
                assert "signature_def['serving_default']" in result.stdout and "crops" in result.stdout
            elif name == "serving.extract":
                assert "8 descriptors written" in result.stdout, result.stdout
            elif name == "serving.search":
                shown = [line for line in result.stdout.splitlines() if ".jpg" in line]
                assert len(shown) >= 8 and os.path.basename(places["q.jpg"]) in shown[0], result.stdout
    finally:
        for process in background:
            process.terminate()
            process.wait(timeout=60)
