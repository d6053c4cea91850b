import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deep_retrieval.retrieval import index as index_lib
from deep_retrieval.retrieval import reranking
from deep_retrieval.retrieval.descriptor_files import build_index
from serving import describer, search
from tests.helpers_images import encoded, reference_descriptors


def _parquet(path, names, vectors):
    pd.DataFrame({"image": names, "descriptor": list(vectors.astype(np.float32))}).to_parquet(path)


def test_query_with_box_saved_model_and_picture(exported, tmp_path):
    root = tmp_path / "db"
    root.mkdir()
    blobs = {f"{i}.jpg": encoded(80, 100, i) for i in range(6)}
    for name, data in blobs.items():
        (root / name).write_bytes(data)
    names = sorted(blobs)
    vectors = reference_descriptors(exported["model"], [blobs[n] for n in names], exported["image_size"])
    _parquet(tmp_path / "d.parquet", names, vectors)
    build_index(str(tmp_path / "d.parquet"), str(tmp_path / "idx"), images_root=str(root))
    index = index_lib.Index.load(str(tmp_path / "idx"))

    query = str(root / "3.jpg")
    data = blobs["3.jpg"]
    vector = describer.Describer(saved_model=exported["version"])(data)
    scores, ids = index.search(vector[None], 3)
    assert ids[0][0] == "3.jpg" and scores[0][0] == pytest.approx(1.0, abs=1e-4)

    box, _ = describer.check_box(data, ["10", "5", "60", "45"])
    cropped = describer.Describer(saved_model=exported["version"])(data, box)
    want = reference_descriptors(exported["model"], [data], exported["image_size"], [box])[0]
    assert np.abs(cropped - want).max() <= 1e-5
    with pytest.raises(ValueError, match="not inside"):
        describer.check_box(data, ["0", "0", "500", "10"])

    picture = str(tmp_path / "r.png")
    search.draw(query, ["10", "5", "60", "45"], list(zip(ids[0], scores[0].tolist())), str(root), picture)
    with Image.open(picture) as im:
        assert im.size == (4 * 208, 230)
        # The query tile carries the red box.
        pixels = np.asarray(im.convert("RGB"))
        assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 50) & (pixels[..., 2] < 50)).sum() > 50


def test_search_command_errors_are_one_line(exported, tmp_path):
    import json
    import subprocess
    import sys

    vectors = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    _parquet(tmp_path / "d.parquet", ["a", "b", "c"], vectors)
    build_index(str(tmp_path / "d.parquet"), str(tmp_path / "idx"))
    (tmp_path / "q.txt").write_text("not an image")
    (tmp_path / "q.jpg").write_bytes(encoded(60, 80, 1))
    base = [sys.executable, "-m", "serving.search", "--index", str(tmp_path / "idx"),
            "--saved_model", exported["version"]]
    for extra, want in ((["--query", str(tmp_path / "q.txt"), "--top", "0"], "--top must be at least 1"),
                        (["--query", str(tmp_path / "q.txt")], "error: the query is not a readable image"),
                        (["--query", str(tmp_path / "q.jpg"), "--saved_model", str(tmp_path)],
                         "cannot load the SavedModel"),
                        (["--query", str(tmp_path / "q.txt"), "--box", "0,0,1,1"],
                         "error: the query is not a readable image")):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        failed_cleanly = result.returncode != 0 and want in result.stderr and "Traceback" not in result.stderr
        assert failed_cleanly and len(result.stderr.strip().splitlines()) == 1, result.stderr[-800:]
    down = subprocess.run([sys.executable, "-m", "serving.search", "--index", str(tmp_path / "idx"), "--server",
                           "127.0.0.1:9", "--query", str(tmp_path / "q.jpg")], capture_output=True, text=True,
                          timeout=300)  # nothing listens on port 9
    assert down.returncode == 1 and down.stderr.strip().splitlines() == [
        down.stderr.strip()] and "UNAVAILABLE" in down.stderr and "is the server running?" in down.stderr
    meta = tmp_path / "idx" / "meta.json"
    fields = json.loads(meta.read_text())
    del fields["dim"]
    meta.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="no valid dim"):
        index_lib.Index.load(str(tmp_path / "idx"))


def test_repeated_rows_are_indexed_once_with_a_warning(tmp_path, capsys):
    vectors = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    _parquet(tmp_path / "d.parquet", ["a", "b", "a", "c"], vectors)
    build_index(str(tmp_path / "d.parquet"), str(tmp_path / "idx"))
    index = index_lib.Index.load(str(tmp_path / "idx"))
    assert list(index.ids) == ["a", "b", "c"]
    np.testing.assert_allclose(index.descriptors[0], vectors[0] / np.linalg.norm(vectors[0]), rtol=1e-5)
    assert "1 repeated image row(s) skipped" in capsys.readouterr().err


def test_the_index_keeps_the_extraction_version_and_queries_ask_for_it(address, exported, tmp_path):
    import pandas as pd

    from deep_retrieval.retrieval.descriptor_files import write_descriptors

    def written(name, version, vectors):
        path = str(tmp_path / name)
        frame = pd.DataFrame({"image": [f"{name}{i}" for i in range(len(vectors))], "descriptor": list(vectors)})
        write_descriptors(frame, path, {"model_name": "deep_retrieval", "model_version": version,
                                                 "signature_name": "serving_default"})
        return path

    rng = np.random.default_rng(3)
    out = str(tmp_path / "idx")
    index = build_index(written("a", 1, rng.normal(size=(4, 32)).astype(np.float32)), out)
    assert index_lib.Index.load(out).metadata["extraction"]["model_version"] == 1 == index["extraction"][
        "model_version"]
    with pytest.raises(ValueError, match="one index holds one model's descriptors"):
        build_index(written("b", 2, rng.normal(size=(2, 32)).astype(np.float32)), out, append=True)
    data = encoded(60, 80, 5)
    served = describer.Describer(server=address, version=1)(data)  # the exported model is version 1
    assert served.shape == (32,)
    with pytest.raises(ValueError, match="NOT_FOUND.*the index holds descriptors of version 9"):
        describer.Describer(server=address, version=9)(data)


def test_top_k_below_one_and_bomb_pictures_are_refused(tmp_path):
    from tests.reliability.corpus import bomb_png

    index = index_lib.Index(4, {}, "exact")
    index.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be at least 1"):
            index.search(np.ones(4, np.float32), k)
        with pytest.raises(ValueError, match="k must be at least 1"):
            reranking.topk(np.ones((1, 4), np.float32), np.eye(4, dtype=np.float32), k)
    (tmp_path / "bomb.png").write_bytes(bomb_png())  # Pillow refuses to open it (DecompressionBombError)
    (tmp_path / "fine.jpg").write_bytes(encoded(50, 40, 1))
    picture = str(tmp_path / "p.png")
    search.draw(str(tmp_path / "fine.jpg"), None, [("bomb.png", 0.9), ("fine.jpg", 0.8)], str(tmp_path), picture)
    assert Image.open(picture).size == (3 * 208, 230)  # the bomb drawn as a missing tile
    with pytest.raises(ValueError, match="cannot draw the query image"):
        search.draw(str(tmp_path / "bomb.png"), None, [], str(tmp_path), picture)


def test_result_pictures_stay_in_their_cells_and_name_their_files(tmp_path):
    from PIL import ImageDraw

    Image.new("RGB", (60, 40), (0, 200, 0)).save(tmp_path / "query.png")
    Image.new("RGB", (1000, 100), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (100, 1000), (0, 0, 255)).save(tmp_path / "tall.png")
    picture = str(tmp_path / "p.png")
    search.draw(str(tmp_path / "query.png"), None, [("wide.png", 0.9), ("tall.png", 0.5)], str(tmp_path), picture)
    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    columns = lambda mask: (np.nonzero(mask.any(0))[0].min(), np.nonzero(mask.any(0))[0].max())  # noqa: E731
    assert 208 <= columns(red)[0] and columns(red)[1] < 2 * 208  # the wide image inside the second cell
    assert 2 * 208 <= columns(blue)[0] and columns(blue)[1] < 3 * 208
    assert np.nonzero(blue.any(1))[0].max() < 200  # and above its caption
    pen = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    long_name = "a/very/long/folder/name/that/goes/on/and/on/until/the/file/IMG_0001.jpg"
    shown = search.fit(pen, long_name, 200)
    assert shown.startswith("…") and shown.endswith("IMG_0001.jpg") and pen.textlength(shown) <= 200
    assert search.fit(pen, "wide.png", 200) == "wide.png"


def test_index_command_builds_from_a_folder_of_shards(tmp_path):
    import subprocess
    import sys

    from deep_retrieval.retrieval.descriptor_files import shard_name

    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(12000, 8)).astype(np.float32)
    (tmp_path / "shards").mkdir()
    for i in range(3):
        rows = slice(4000 * i, 4000 * (i + 1))
        _parquet(tmp_path / "shards" / shard_name(i, 3), [f"{j}.jpg" for j in range(12000)][rows], vectors[rows])
    command = [sys.executable, "-m", "serving.index", "--descriptors", str(tmp_path / "shards"), "--output",
               str(tmp_path / "idx"), "--kind", "ivfpq", "--factory", "IVF8,PQ4", "--nprobe", "8", "--noprogress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # One line: Faiss's own prints about its on-disk lists are not passed on.
    assert result.stdout.strip().splitlines() == [
        f"{tmp_path / 'idx'}: ivfpq index of 12000 descriptors of size 8 (IVF8,PQ4)"], result.stdout
    index = index_lib.Index.load(str(tmp_path / "idx"))
    assert index.nprobe == 8 and index.ids[4000] == "4000.jpg"
    bad = subprocess.run(command[:-7] + ["--kind", "ivfpq", "--factory", "HNSW32"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: factory 'HNSW32' has no IVF{K} part: ivfpq indexes are inverted files (their lists are merged "
        "on disk)"], bad.stderr
