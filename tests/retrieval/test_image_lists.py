"""The images of a batch extraction (`deep_retrieval.retrieval.image_lists`);
a folder walk end to end is in `tests/serving/test_extract.py`."""

import os

import pytest

from deep_retrieval.retrieval import image_lists
from tests.helpers_images import encoded


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        image_lists.list_images(str(tmp_path / "nothing"))
    csv = tmp_path / "x.csv"
    csv.write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match="'image' column"):
        image_lists.list_images(str(csv))
    for text, reason in [("", "the CSV is empty"), ("image\n", "lists no images")]:
        csv.write_text(text)
        with pytest.raises(ValueError, match=reason):
            image_lists.list_images(str(csv))


def test_csv_names_are_read_verbatim(tmp_path):
    for name in ("007.jpg", "1e5", "NA"):
        (tmp_path / name).write_bytes(encoded(16, 16))
    csv = tmp_path / "list.csv"
    csv.write_text("image\n007.jpg\n1e5\nNA\n")
    items, _ = image_lists.list_images(str(csv))
    assert [n for n, _ in items] == ["007.jpg", "1e5", "NA"]
    assert all(os.path.isfile(p) for _, p in items)


def test_only_regular_files_are_read_and_reads_are_bounded(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would block the run forever
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "big.jpg").write_bytes(b"x" * 2000)
    (tmp_path / "ok.jpg").write_bytes(b"fine")
    for name, reason in (("pipe.jpg", "not a regular file"), ("zero.jpg", "not a regular file"),
                         ("big.jpg", "2000 bytes, more than --max_message_bytes 1000")):
        got = image_lists.read_file(str(tmp_path / name), 1000)
        assert isinstance(got, OSError) and reason in str(got), (name, got)
    assert image_lists.read_file(str(tmp_path / "ok.jpg"), 1000) == b"fine"


def test_printable_names_are_one_to_one_and_stay_on_one_line():
    names = ["a\rb.jpg", "a\\x0db.jpg", "a\nb.jpg", os.fsdecode(b"a\xffb.jpg"), "a\\xffb.jpg", "plain é.jpg"]
    printed = [image_lists.printable_name(n) for n in names]
    assert len(set(printed)) == len(names)
    assert printed[0] == "a\\x0db.jpg" and printed[1] == "a\\\\x0db.jpg" and printed[-1] == "plain é.jpg"
    assert not any(c in p for p in printed for c in "\r\n")
