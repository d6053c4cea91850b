"""Descriptor files: the run record, and the index built from them."""

import numpy as np
import pandas as pd
import pytest

from deep_retrieval import descriptor_files, search
from deep_retrieval.descriptor_files import build_index


def _parquet(path, names, vectors):
    pd.DataFrame({"image": names, "descriptor": list(vectors.astype(np.float32))}).to_parquet(path)


def test_build_append_and_refuse(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    _parquet(tmp_path / "a.parquet", [f"a{i}" for i in range(20)], vectors[:20])
    _parquet(tmp_path / "b.parquet", [f"a{i}" for i in range(10, 30)], vectors[10:])
    out = str(tmp_path / "idx")
    built = build_index(str(tmp_path / "a.parquet"), out, images_root=str(tmp_path))
    assert built.kind == "exact" and len(built) == 20
    grown = build_index(str(tmp_path / "b.parquet"), out, append=True)
    assert len(grown) == 30 and len(set(grown.ids)) == 30  # a10..a19 not added twice
    loaded = search.Index.load(out)
    assert loaded.metadata["images_root"] == str(tmp_path)
    _, ids = loaded.search(vectors[25], 1)
    assert ids[0][0] == "a25"
    _parquet(tmp_path / "c.parquet", ["x"], np.zeros((1, 4)))
    with pytest.raises(ValueError, match="size 8, but the model produces 4"):
        build_index(str(tmp_path / "c.parquet"), out, append=True)
    with pytest.raises(ValueError, match="cannot read Parquet"):
        build_index(str(tmp_path / "missing.parquet"), out)


def test_run_record_travels_in_the_schema_and_into_the_index(tmp_path):
    frame = pd.DataFrame({"image": ["a", "b"], "descriptor": list(np.eye(2, dtype=np.float32))})
    info = {"model_name": "deep_retrieval", "model_version": 3, "signature": "serving_default"}
    descriptor_files.write_descriptors(frame, str(tmp_path / "d.parquet"), info)
    assert descriptor_files.read_run_info(str(tmp_path / "d.parquet")) == info
    assert pd.read_parquet(tmp_path / "d.parquet")["image"].tolist() == ["a", "b"]
    frame.to_parquet(tmp_path / "plain.parquet")
    assert descriptor_files.read_run_info(str(tmp_path / "plain.parquet")) is None
    index = build_index(str(tmp_path / "d.parquet"), str(tmp_path / "idx"))
    assert search.Index.load(str(tmp_path / "idx")).metadata["extraction"] == info == index.metadata["extraction"]
    descriptor_files.write_descriptors(frame, str(tmp_path / "v4.parquet"), {**info, "model_version": 4})
    with pytest.raises(ValueError, match="one index holds one model's descriptors"):
        build_index(str(tmp_path / "v4.parquet"), str(tmp_path / "idx"), append=True)
