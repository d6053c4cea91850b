import os

import pytest

from deep_retrieval.io.atomic import atomic_text, atomic_write


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.txt"
    atomic_text(str(path), "old")
    seen = []

    def failing(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), failing, ".keras")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]  # no temporary left
    assert seen[0].endswith(".keras") and os.path.dirname(seen[0]) == str(tmp_path)
    assert atomic_text(str(path), "new") == str(path) and path.read_text() == "new"
    folder = tmp_path / "made"
    atomic_write(str(folder), lambda tmp: (os.makedirs(tmp), open(os.path.join(tmp, "x"), "w").close()))
    assert os.listdir(folder) == ["x"]
    write_y = lambda tmp: (os.makedirs(tmp), open(os.path.join(tmp, "y"), "w").close())  # noqa: E731
    atomic_write(str(folder), write_y)  # an existing folder is swapped out
    assert os.listdir(folder) == ["y"] and not os.path.exists(f"{folder}.old")
    os.rename(folder, f"{folder}.old")  # as a swap killed between its two renames leaves it
    with pytest.raises(RuntimeError):
        atomic_write(str(folder), lambda tmp: (_ for _ in ()).throw(RuntimeError("killed")))
    assert os.listdir(folder) == ["y"]  # the previous folder came back
