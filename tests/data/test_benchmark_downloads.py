"""Benchmarks fetched by name from a loopback server standing in for the
publishers: archives in their layout (a folder of JPEGs, as
``oxbuild_images-v1.tgz``), cirtorch's ground-truth pickle, Holidays' names;
resumed, unpacked safely, found again without network."""

import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from deep_retrieval.data import benchmark_downloads, groundtruth
from tests.helpers_http import serving
from tests.helpers_images import encoded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tgz(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _revisited_gnd():
    """cirtorch's gnd_roxford5k.pkl layout: names without extension, one
    dict per query with its box and easy/hard/junk indices."""
    return {"imlist": ["all_souls_000001", "all_souls_000002", "radcliffe_camera_000003"],
            "qimlist": ["all_souls_000013"],
            "gnd": [{"bbx": [1.0, 2.0, 30.0, 20.0], "easy": [0], "hard": [1], "junk": [2]}]}


def test_roxford5k_is_fetched_resumed_unpacked_and_then_found_without_network(tmp_path, monkeypatch):
    images = [f"oxbuild_images/{n}.jpg" for n in ("all_souls_000001", "all_souls_000002", "radcliffe_camera_000003",
                                                  "all_souls_000013")]
    archive = _tgz([(n, encoded(24, 32, seed=i)) for i, n in enumerate(images)] + [("oxbuild_images/README", b"x")])
    files = {"/vgg/oxbuild_images-v1.tgz": archive, "/gt/gnd_roxford5k.pkl": pickle.dumps(_revisited_gnd())}
    root = str(tmp_path / "data")
    with serving(files) as (url, state):
        monkeypatch.setitem(benchmark_downloads.BENCHMARKS, "roxford5k",
                            {"archives": [url + "/vgg/oxbuild_images-v1.tgz"], "gnd": url + "/gt/gnd_roxford5k.pkl"})
        state.break_after = len(archive) // 2
        with pytest.raises(ValueError, match="run again to resume"):
            benchmark_downloads.download_benchmark("roxford5k", root, progress=False)
        assert not os.path.exists(os.path.join(root, "roxford5k", "jpg"))
        state.break_after = None
        folder = benchmark_downloads.download_benchmark("roxford5k", root, progress=False)
        assert state.requests[1][1] == f"bytes={len(archive) // 2}-"
        served = len(state.requests)
    assert sorted(os.listdir(os.path.join(folder, "jpg"))) == sorted(os.path.basename(n) for n in images)
    data = groundtruth.load_dataset(root, "roxford5k")
    assert [os.path.basename(p) for p in data.images] == ["all_souls_000001.jpg", "all_souls_000002.jpg",
                                                          "radcliffe_camera_000003.jpg"]
    assert data.query_boxes == [(1.0, 2.0, 30.0, 20.0)]
    # Already there: the server is gone and nothing is fetched.
    assert benchmark_downloads.download_benchmark("roxford5k", root, progress=False) == folder
    assert served == 3


def test_an_archive_with_a_parent_member_is_refused(tmp_path, monkeypatch):
    archive = _tgz([("jpg/100000.jpg", encoded(8, 8)), ("../../escaped.jpg", encoded(8, 8))])
    root = str(tmp_path / "data")
    with serving({"/jpg1.tar.gz": archive}) as (url, _):
        monkeypatch.setitem(benchmark_downloads.BENCHMARKS, "holidays",
                            {"archives": [url + "/jpg1.tar.gz"], "gnd": None})
        with pytest.raises(ValueError, match="outside the target folder"):
            benchmark_downloads.download_benchmark("holidays", root, progress=False)
    assert os.listdir(os.path.join(root, "holidays")) == []  # no jpg/, no temporary
    assert not any(n.endswith("escaped.jpg") for _, _, names in os.walk(tmp_path) for n in names)


def test_holidays_ground_truth_groups_images_by_name(tmp_path, monkeypatch):
    names = ["100000", "100001", "100002", "100100", "100101"]
    parts = [_tgz([(f"jpg/{n}.jpg", encoded(8, 8, seed=i)) for i, n in enumerate(names[:3])]),
             _tgz([(f"jpg/{n}.jpg", encoded(8, 8, seed=i)) for i, n in enumerate(names[3:])])]
    root = str(tmp_path / "data")
    with serving({"/jpg1.tar.gz": parts[0], "/jpg2.tar.gz": parts[1]}) as (url, _):
        monkeypatch.setitem(benchmark_downloads.BENCHMARKS, "holidays",
                            {"archives": [url + "/jpg1.tar.gz", url + "/jpg2.tar.gz"], "gnd": None})
        benchmark_downloads.download_benchmark("holidays", root, progress=False)
    data = groundtruth.load_dataset(root, "holidays")
    assert [os.path.basename(q) for q in data.queries] == ["100000.jpg", "100100.jpg"]
    assert data.query_indices == [0, 3]
    # Positives: the rest of each group (the query is removed at evaluation).
    assert [list(np.asarray(g["ok"])) for g in data.gnd] == [[1, 2], [4]]


def test_download_needs_a_known_dataset():
    with pytest.raises(ValueError, match="no publisher recorded for 'sfm120k'"):
        benchmark_downloads.download_benchmark("sfm120k", "unused")
    done = subprocess.run([sys.executable, "-m", "training.evaluate", "--download"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "--download needs --dataset" in done.stderr
