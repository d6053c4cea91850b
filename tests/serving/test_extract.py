import os

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from deep_retrieval.retrieval import descriptor_files, image_lists, part_store
from serving import batch_client
from tests.helpers_images import encoded, reference_descriptors


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    files = {"one.jpg": encoded(60, 80, 1), "a/two.png": encoded(90, 40, 2, "PNG"),
             "a/b/three.jpg": encoded(50, 50, 3), "a/b/four.JPG": encoded(70, 70, 4),
             "corrupt.jpg": b"\xff\xd8 truncated", "empty.png": b""}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    return root, files


def _extractor(address, servers=None):
    replicas = batch_client.Replicas(servers or [address], 64 << 20)
    return batch_client.Extractor(replicas, "deep_retrieval", "serving_default", 60, 4)


def test_folder_with_bad_files(address, exported, folder, tmp_path):
    root, files = folder
    out = str(tmp_path / "d.parquet")
    items, _ = image_lists.list_images(str(root))
    assert sorted(n for n, _ in items) == sorted(files)  # recursive, notes.txt skipped
    count, failed = batch_client.extract(items, out, _extractor(address), batch_size=3, progress=False)
    assert (count, failed) == (4, 2)
    frame = pd.read_parquet(out)
    assert sorted(frame["image"]) == sorted(["one.jpg", "a/two.png", "a/b/three.jpg", "a/b/four.JPG"])
    want = reference_descriptors(exported["model"], [files[n] for n in frame["image"]], exported["image_size"])
    got = np.stack(frame["descriptor"].to_numpy())
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-5
    errors = pd.read_csv(out + ".errors.csv")
    reasons = dict(zip(errors["image"], errors["reason"]))
    assert set(reasons) == {"corrupt.jpg", "empty.png"}
    assert "cannot decode image" in reasons["corrupt.jpg"] and reasons["empty.png"] == "empty file"
    assert not os.path.exists(out + ".parts")


def test_csv_input_byte_cap_and_failover(address, folder, tmp_path):
    root, files = folder
    csv = tmp_path / "list.csv"
    pd.DataFrame({"image": ["one.jpg", "a/two.png", "missing.jpg"]}).to_csv(csv, index=False)
    items, _ = image_lists.list_images(str(csv), data_dir=str(root))
    dead = "127.0.0.1:1"  # nothing listens there: every request to it fails over
    out = str(tmp_path / "c.parquet")
    count, failed = batch_client.extract(items, out, _extractor(address, [dead, address]),
                                        max_request_bytes=1, progress=False)
    assert (count, failed) == (2, 1)
    assert pd.read_parquet(out)["image"].tolist() == ["one.jpg", "a/two.png"]
    assert "cannot read file" in pd.read_csv(out + ".errors.csv")["reason"][0]


class _Interrupting:
    """Passes the first ``allowed`` batches through, then fails like a kill."""

    def __init__(self, inner, allowed):
        self.inner, self.allowed, self.sent = inner, allowed, []

    def __getattr__(self, name):  # pin, version, model_name, ...
        return getattr(self.inner, name)

    def run(self, batch):
        if len(self.sent) >= self.allowed:
            raise KeyboardInterrupt
        self.sent.append([n for n, _ in batch])
        return self.inner.run(batch)


def test_interrupted_run_resumes_without_loss_or_duplicates(address, folder, tmp_path):
    root, _ = folder
    items, _ = image_lists.list_images(str(root))
    out = str(tmp_path / "r.parquet")
    first = _Interrupting(_extractor(address), allowed=1)
    with pytest.raises(KeyboardInterrupt):
        batch_client.extract(items, out, first, batch_size=2, in_flight=1, chunk_size=2, progress=False)
    done = set(sum(first.sent, []))
    second = _Interrupting(_extractor(address), allowed=100)
    batch_client.extract(items, out, second, batch_size=2, in_flight=1, chunk_size=2, progress=False)
    resent = set(sum(second.sent, []))
    assert done and not (done & resent)
    frame = pd.read_parquet(out)
    errors = pd.read_csv(out + ".errors.csv")
    names = list(frame["image"]) + list(errors["image"])
    assert sorted(names) == sorted(n for n, _ in items) and len(names) == len(set(names))


def test_empty_folders_fail_and_skipped_files_are_reported(folder, tmp_path):
    import subprocess
    import sys

    root, _ = folder
    (root / "scan.tif").write_bytes(b"II*\x00")
    items, skipped = image_lists.list_images(str(root))
    assert len(items) == 6
    assert [(n, r.split(":")[0]) for n, r in skipped] == [("notes.txt", ".txt"), ("scan.tif", ".tif")]
    assert all("not an image type" in r for _, r in skipped)
    only_tiffs = tmp_path / "tiffs"
    (only_tiffs / "sub").mkdir(parents=True)
    (only_tiffs / "sub" / "a.tif").write_bytes(b"II*\x00")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* 1 other files skipped"):
        image_lists.list_images(str(only_tiffs))
    for source in (tmp_path / "empty", only_tiffs):
        out = tmp_path / f"{source.name}.parquet"
        result = subprocess.run([sys.executable, "-m", "serving.extract", "--images", str(source), "--output",
                                 str(out), "--server", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
        assert "no images" in result.stderr and not os.path.exists(out)


def test_all_images_failing_is_an_error(address, tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "d.parquet"
    result = subprocess.run([sys.executable, "-m", "serving.extract", "--images", str(tmp_path / "bad"), "--output",
                             str(out), "--server", address, "--noprogress"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "all 1 images failed" in result.stderr, result.stderr
    assert list(pd.read_csv(f"{out}.errors.csv")["image"]) == ["a.jpg"]


class _Failure(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class _FakeReplicas:
    """A server answering a 2-D descriptor per image, failing as told."""

    def __init__(self, fail, version=1):
        self.fail, self.calls, self.version = fail, 0, version
        self.addresses, self.stubs = ["fake"], [self]

    def pick(self, attempt):
        return "fake", self

    def GetModelMetadata(self, request, timeout=None):
        from tensorflow_serving.apis import get_model_metadata_pb2

        if request.model_spec.HasField("version") and request.model_spec.version.value != self.version:
            raise _Failure(grpc.StatusCode.NOT_FOUND, "no such version")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def["serving_default"].method_name = "tensorflow/serving/predict"
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.version.value = self.version
        response.metadata["signature_def"].Pack(signatures)
        return response

    def Predict(self, request, timeout=None):
        from tensorflow_serving.apis import predict_pb2

        self.calls += 1
        blobs = list(tf.make_ndarray(request.inputs["images"]))
        error = self.fail(blobs)
        if error:
            raise error
        if request.model_spec.HasField("version") and request.model_spec.version.value != self.version:
            raise _Failure(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(m, ...)")
        response = predict_pb2.PredictResponse()
        response.model_spec.version.value = self.version
        response.outputs["descriptors"].CopyFrom(
            tf.make_tensor_proto(np.array([[len(b), 1.0] for b in blobs], np.float32)))
        return response


def test_every_item_is_isolated_whatever_the_code():
    from serving import batch_client

    def fail(blobs):
        if b"bomb" in blobs:  # the server runs out of memory on it: UNKNOWN
            return _Failure(grpc.StatusCode.UNKNOWN, "out of memory")
        if len(blobs) > 4:  # too large a message
            return _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large")
        return None

    items = [(f"{i}.jpg", b"x" * (i + 1)) for i in range(9)] + [("bomb.jpg", b"bomb")]
    extractor = batch_client.Extractor(_FakeReplicas(fail), "m", "serving_default", 5, 3)
    rows, errors = extractor.run(items)
    assert sorted(n for n, _ in rows) == sorted(n for n, _ in items if n != "bomb.jpg")
    assert errors == [("bomb.jpg", "UNKNOWN: out of memory")]
    down = batch_client.Extractor(_FakeReplicas(lambda b: _Failure(grpc.StatusCode.UNAVAILABLE, "down")),
                                 "m", "serving_default", 5, 2)
    with pytest.raises(grpc.RpcError):
        down.run(items[:2])  # nobody answers: the run stops (and resumes later), nothing is marked failed


def test_a_stopped_run_keeps_the_batches_that_finished(tmp_path):
    from deep_retrieval.retrieval import part_store
    from serving import batch_client

    state = {"n": 0}

    def fail(blobs):
        state["n"] += 1
        return _Failure(grpc.StatusCode.UNAVAILABLE, "gone") if b"late" in blobs else None

    items = [(f"{i}.jpg", None) for i in range(4)]
    for i, (name, _) in enumerate(items):
        (tmp_path / name).write_bytes(b"late" if i == 3 else b"ok%d" % i)
    paths = [(n, str(tmp_path / n)) for n, _ in items]
    extractor = batch_client.Extractor(_FakeReplicas(fail), "m", "serving_default", 5, 1)
    out = str(tmp_path / "d.parquet")
    with pytest.raises(grpc.RpcError):
        batch_client.extract(paths, out, extractor, batch_size=1, in_flight=1, progress=False)
    kept = part_store.PartStore(out).done()
    assert set(kept) == {"0.jpg", "1.jpg", "2.jpg"}  # committed although the run stopped


def test_sharded_output_is_in_input_order_also_after_a_resume(tmp_path):
    from deep_retrieval.retrieval.descriptor_files import read_run_info

    state = {"stop": True}

    def fail(blobs):
        if b"x" * 7 in blobs and state["stop"]:  # the replica goes away at the 7th image: the run stops
            return _Failure(grpc.StatusCode.UNAVAILABLE, "gone")
        return _Failure(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode") if b"bad" in blobs else None

    paths = []
    for i in range(11):  # file i holds i + 1 bytes (the fake's descriptor is [length, 1]); 5.jpg is bad
        name = f"{i:02d}.jpg"
        (tmp_path / name).write_bytes(b"bad" if i == 5 else b"x" * (11 - i))  # sizes fall: by_size reorders
        paths.append((name, str(tmp_path / name)))
    out = str(tmp_path / "shards")
    extractor = batch_client.Extractor(_FakeReplicas(fail), "m", "serving_default", 5, 1)
    with pytest.raises(grpc.RpcError):
        batch_client.extract(paths, out, extractor, batch_size=2, in_flight=1, chunk_size=3, progress=False,
                            shard_size=4)
    state["stop"] = False
    count, failed = batch_client.extract(paths, out, extractor, batch_size=2, in_flight=1, chunk_size=3,
                                        progress=False, shard_size=4)
    assert (count, failed) == (10, 1)
    assert sorted(os.listdir(out)) == [f"descriptors-0000{i}-of-00003.parquet" for i in range(3)]
    frames = [pd.read_parquet(os.path.join(out, f)) for f in sorted(os.listdir(out))]
    assert [len(f) for f in frames] == [4, 4, 2]
    names = [n for f in frames for n in f["image"]]
    assert names == [n for n, _ in paths if n != "05.jpg"]  # input order across the shards
    lengths = [int(v[0]) for f in frames for v in f["descriptor"]]
    assert lengths == [11 - int(n[:2]) for n in names]  # each row its own image's descriptor
    assert read_run_info(os.path.join(out, "descriptors-00002-of-00003.parquet"))["model_version"] == 1
    assert list(pd.read_csv(out + ".errors.csv")["image"]) == ["05.jpg"]
    assert not os.path.exists(out + ".parts")


def test_the_model_version_is_pinned_recorded_and_never_mixed(tmp_path):
    paths = []
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(b"img%d" % i)
        paths.append((f"{i}.jpg", str(tmp_path / f"{i}.jpg")))
    out = str(tmp_path / "d.parquet")
    replicas = _FakeReplicas(lambda blobs: None, version=1)

    def deploy_after_two(blobs):  # version 2 replaces version 1 in the middle of the run
        if replicas.calls > 2:
            replicas.version = 2

    replicas.fail = deploy_after_two
    extractor = batch_client.Extractor(replicas, "m", "serving_default", 5, 1)
    with pytest.raises(grpc.RpcError) as stopped:
        batch_client.extract(paths, out, extractor, batch_size=1, in_flight=1, chunk_size=1, progress=False)
    assert stopped.value.code() == grpc.StatusCode.NOT_FOUND  # the run stops: no image marked failed
    store = part_store.PartStore(out)
    assert store.run_info() == {"model_name": "m", "model_version": 1, "signature_name": "serving_default"}
    assert len(store.done()) == 2 and not any(f.endswith(".errors.csv") for f in os.listdir(store.folder))
    store.close()
    # Resuming against version 2 refuses to mix ...
    with pytest.raises(ValueError, match="holds descriptors of model version 1"):
        batch_client.extract(paths, out, batch_client.Extractor(_FakeReplicas(lambda b: None, 2), "m",
                                                              "serving_default", 5, 1), progress=False)
    # ... and finishes where version 1 is served, which the output records.
    count, failed = batch_client.extract(paths, out, batch_client.Extractor(_FakeReplicas(lambda b: None, 1), "m",
                                                                          "serving_default", 5, 1), progress=False)
    assert (count, failed) == (6, 0)
    assert descriptor_files.read_run_info(out)["model_version"] == 1
    # A version or signature the replicas do not serve is refused before any work.
    with pytest.raises(ValueError, match="no replica serves model 'm' version 7"):
        batch_client.Extractor(_FakeReplicas(None), "m", "serving_default", 5, 1, version=7).pin()
    with pytest.raises(ValueError, match="no signature 'crops'"):
        batch_client.Extractor(_FakeReplicas(None), "m", "crops", 5, 1).pin()


def test_replicas_serving_different_versions_are_refused():
    class Two:
        def __init__(self):
            self.addresses, self.stubs = ["a:1", "b:1"], [_FakeReplicas(None, 1), _FakeReplicas(None, 2)]

    with pytest.raises(ValueError, match="different versions"):
        batch_client.Extractor(Two(), "m", "serving_default", 5, 1).pin()


def test_same_size_images_share_a_request(tmp_path):
    from serving import batch_client

    sent = []

    def record(blobs):
        sent.append(sorted(blobs))
        return None

    sizes = [(40, 60), (80, 30), (40, 60), (80, 30), (40, 60), (80, 30)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        (tmp_path / f"{i}.png").write_bytes(encoded(h, w, i, "PNG"))
        paths.append((f"{i}.png", str(tmp_path / f"{i}.png")))
    blobs = {name: (tmp_path / name).read_bytes() for name, _ in paths}
    extractor = batch_client.Extractor(_FakeReplicas(record), "m", "serving_default", 5, 1)
    out = str(tmp_path / "d.parquet")
    batch_client.extract(paths, out, extractor, batch_size=3, in_flight=1, progress=False)
    by_shape = [sorted(blobs[f"{i}.png"] for i in group) for group in ([0, 2, 4], [1, 3, 5])]
    assert sorted(sent) == sorted(by_shape)  # two requests, one per image size
    frame = pd.read_parquet(out)
    assert frame["image"].tolist() == [n for n, _ in paths]  # input order kept
    np.testing.assert_array_equal(np.stack(frame["descriptor"])[:, 0], [len(blobs[n]) for n, _ in paths])
