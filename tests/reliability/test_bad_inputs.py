"""Every file of the bad-input corpus through every component that reads images.

Expected everywhere: ``"ok"`` files are used (decoded to RGB), ``"error"``
files are reported one by one with the file and the reason, and the rest of
the work is done. The decompression bomb is refused before decoding.
"""

import os
import resource

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from deep_retrieval.data import images, manifest, pipeline
from deep_retrieval.io.atomic import atomic_csv
from deep_retrieval.retrieval import extraction, image_lists
from serving import batch_client
from tests.reliability.corpus import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("corpus"))
    files = make_corpus(folder, huge_side=4000)
    return folder, files


def _path(folder, name):
    return os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name)))


def _split(files):
    ok = sorted(n for n, e in files.items() if e == "ok")
    bad = sorted(n for n, e in files.items() if e == "error")
    return ok, bad


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_training_manifest_and_loader(corpus):
    folder, files = corpus
    ok, bad = _split(files)
    utf8_ok = [n for n in ok if "\udce9" not in n]  # NA, 007 and a carriage return kept verbatim
    rows = [(n, i // 2) for i, n in enumerate(utf8_ok)] + [(n, 99) for n in bad]
    csv = os.path.join(folder, "manifest.csv")
    atomic_csv(csv, pd.DataFrame(rows, columns=["image", "label"]))  # quoted: the carriage return stays
    m = manifest.read_manifest(csv, folder)
    reasons = {p.image: p.reason for p in m.problems}
    assert set(bad) <= set(reasons)
    assert "decompression bomb" in reasons["bomb.png"]
    for name in set(bad) - {"zero.jpg"}:
        assert reasons[name].startswith("unreadable image"), (name, reasons[name])
    assert "not a regular file" in reasons["pipe.jpg"]
    assert reasons["zero.jpg"].startswith("path escapes the data directory")  # the link leads to /dev/zero
    kept = set(m.frame["image"])
    assert kept | set(reasons) == set(utf8_ok) | set(bad)
    assert set(utf8_ok) - kept <= {n for n, r in reasons.items() if "no other image" in r}
    # Every kept image goes through the training decoder.
    got = [int(i) for i, _ in pipeline.image_dataset(m.frame["path"].tolist(), 64)]
    assert got == list(range(len(m.frame)))


def test_evaluation_loader_names_each_bad_file(corpus):
    folder, files = corpus
    ok, bad = _split(files)
    names = ok + bad
    paths = [_path(folder, n) for n in names]
    before = _peak_rss_mb()
    fn = extraction.compiled_fn(lambda views: tf.reduce_mean(views[0], axis=[1, 2]))
    desc, failed = extraction.extract(fn, paths, 96, progress=False, strict=False)
    assert sorted(names[i] for i in failed) == bad
    good = [i for i in range(len(names)) if i not in set(failed)]
    assert (np.abs(desc[good]).sum(axis=1) > 0).all()
    assert _peak_rss_mb() - before < 1500  # the bomb (7.5 GB decoded) was never decoded
    with pytest.raises(ValueError) as error:
        extraction.extract(fn, paths, 96, progress=False)
    text = str(error.value)
    assert f"{len(bad)} image(s) could not be read or decoded" in text
    assert "decompression bomb" in text and "bomb.png" in text


def _extractor(address):
    return batch_client.Extractor(batch_client.Replicas([address], 256 << 20), "deep_retrieval",
                                 "serving_default", 120, 3)


def test_embedded_server_refuses_the_bomb_inside_a_batch(corpus, address):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    folder, _ = corpus
    blobs = [open(_path(folder, n), "rb").read() for n in ("plain.jpg", "bomb.png", "alpha.png")]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))

    def request(items):
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "deep_retrieval"
        r.inputs["images"].CopyFrom(tf.make_tensor_proto(items, dtype=tf.string, shape=[len(items)]))
        return r

    before = _peak_rss_mb()
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request(blobs), timeout=120)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1]" in error.value.details() and "decompression bomb" in error.value.details()
    assert _peak_rss_mb() - before < 1500
    # The server keeps serving.
    out = stub.Predict(request([blobs[0], blobs[2]]), timeout=120)
    assert tf.make_ndarray(out.outputs["descriptors"]).shape == (2, 32)


@pytest.mark.parametrize("source", ["folder", "csv"])
def test_extraction_client(corpus, address, tmp_path, source):
    folder, files = corpus
    ok, bad = _split(files)
    if source == "folder":
        items, _ = image_lists.list_images(folder)
        items = [(n, p) for n, p in items if not n.endswith(".csv")]
        # A folder walk takes image extensions only (NA and 007 have none).
        expect_ok = {image_lists.printable_name(n) for n in ok if n.lower().endswith(images.EXTENSIONS)}
    else:
        names = [n for n in ok + bad if "\udce9" not in n]
        csv = tmp_path / "list.csv"
        atomic_csv(str(csv), pd.DataFrame({"image": names}))
        items, _ = image_lists.list_images(str(csv), data_dir=folder)
        expect_ok = {n for n in ok if "\udce9" not in n}
    out = str(tmp_path / "d.parquet")
    count, failed = batch_client.extract(items, out, _extractor(address), batch_size=4, progress=False)
    assert (count, failed) == (len(expect_ok), len(bad))
    frame = pd.read_parquet(out)
    assert set(frame["image"]) == expect_ok
    if source == "folder":
        assert "caf\\xe9_latin1.jpg" in set(frame["image"])
    assert np.isfinite(np.stack(frame["descriptor"].to_numpy())).all()
    errors = pd.read_csv(out + ".errors.csv", keep_default_na=False)
    reasons = dict(zip(errors["image"], errors["reason"]))
    assert set(reasons) == set(bad)
    assert reasons["empty.jpg"] == "empty file"
    assert "decompression bomb" in reasons["bomb.png"]
    for name in ("truncated.jpg", "random_bytes.jpg", "text.png"):
        assert "cannot decode image" in reasons[name], (name, reasons[name])
    for name in ("bomb.webp", "frames_bomb.gif"):
        assert "image refused" in reasons[name] and "decompression bomb" in reasons[name], (name, reasons[name])
    assert "JPEG XL is not accepted" in reasons["jpeg_xl.png"]
    for name in ("pipe.jpg", "zero.jpg"):
        assert "not a regular file" in reasons[name], (name, reasons[name])
    if source == "csv":
        assert {"NA", "007", "line\rbreak.jpg"} <= set(frame["image"])  # written and read back verbatim


def test_cleaning_command(corpus, tmp_path):
    from deep_retrieval.cleaning import runner
    from deep_retrieval.config import CleanConfig

    folder, files = corpus
    ok, bad = _split(files)
    names = [n for n in ok + bad if "\udce9" not in n]
    csv = tmp_path / "noisy.csv"
    atomic_csv(str(csv), pd.DataFrame({"image": names, "label": "x"}))
    runner.run(str(csv), folder, str(tmp_path / "clean.csv"), CleanConfig(workers=1), progress=False)
    decisions = pd.read_csv(str(tmp_path / "clean.csv") + ".decisions.csv", keep_default_na=False)
    reasons = dict(zip(decisions["image"], decisions["reason"]))
    assert set(reasons) == set(names)
    assert "decompression bomb" in reasons["bomb.png"]
    for name in set(bad) - {"zero.jpg"}:
        assert reasons[name].startswith(("unreadable image", "image of")), (name, reasons[name])
    assert reasons["zero.jpg"].startswith("path escapes the data directory")  # the link leads to /dev/zero
    for name in set(names) - set(bad):
        assert not reasons[name].startswith("unreadable"), (name, reasons[name])
