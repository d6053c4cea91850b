"""Resumable committed chunks (`deep_retrieval.retrieval.part_store`); resuming
end to end is in `tests/serving/test_extract.py`."""

import pytest

from deep_retrieval.retrieval import part_store


def test_one_run_per_output(tmp_path):
    out = str(tmp_path / "d.parquet")
    first = part_store.PartStore(out)
    with pytest.raises(ValueError, match="another extraction is writing it"):
        part_store.PartStore(out)
    first.close()  # the run ends
    part_store.PartStore(out).close()
