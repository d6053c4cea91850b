"""numpy arrays and plain objects from untrusted pickles, against what numpy
and pickle themselves produce."""

import io
import pickle

import numpy as np
import pytest

from deep_retrieval.io import pickled_data, torch_pickle


def _load(obj, plain=()):
    data = pickle.dumps(obj, protocol=2)
    unpickler = torch_pickle.CheckpointUnpickler(io.BytesIO(data), None, "test.pkl",
                                                     pickled_data.globals_for(plain))
    return pickled_data.materialize(unpickler.load())


class Record:
    pass


def test_arrays_scalars_and_byte_orders_round_trip():
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.eye(3)), np.array([1, -2], ">i4"),
              np.zeros((0, 5)), np.array([True, False])]
    got = _load({"a": arrays, "s": np.float64(0.25), "i": np.int64(7)})
    for a, b in zip(got["a"], arrays):
        assert a.shape == b.shape and a.dtype.kind == b.dtype.kind
        np.testing.assert_array_equal(a, b)
    assert got["s"] == 0.25 and got["i"] == 7


def test_allowed_classes_become_records_and_others_are_refused():
    Record.__module__ = __name__
    r = Record()
    r.mean_, r.whiten = np.ones(3), True
    record = _load({"pca": r}, plain=[f"{__name__}.Record"])["pca"]
    assert isinstance(record, pickled_data.PlainObject) and not isinstance(record, Record)
    assert record.class_name.endswith("Record") and record.attributes["whiten"] is True
    np.testing.assert_array_equal(record.attributes["mean_"], np.ones(3))
    with pytest.raises(torch_pickle.CheckpointError, match="refused to load the global .*Record"):
        _load({"pca": r})


def test_object_arrays_are_refused():
    with pytest.raises(torch_pickle.CheckpointError, match="numbers only|not plain numbers"):
        _load(np.array([{"a": 1}], dtype=object))
