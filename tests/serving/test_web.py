import html.parser
import http.client
import json
import shutil
import subprocess
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from deep_retrieval.retrieval.descriptor_files import build_index
from deep_retrieval.retrieval.index import Index
from serving.describer import Describer
from serving.web import Searcher, WebServer
from tests.helpers_images import encoded

SIZES = [(60, 80), (80, 60), (64, 96), (70, 70), (90, 50), (50, 90), (72, 64), (66, 88)]


@pytest.fixture(scope="module")
def site(exported, tmp_path_factory):
    """A web page over an index of eight images, described by the SavedModel."""
    root = tmp_path_factory.mktemp("web")
    photos = root / "photos" / "sub folder"
    photos.mkdir(parents=True)
    describer = Describer(saved_model=exported["version"])
    names, vectors = [], []
    for i, (h, w) in enumerate(SIZES):
        name = f"sub folder/photo {i}.jpg"
        data = encoded(h, w, 10 + i)
        (root / "photos" / name).write_bytes(data)
        names.append(name)
        vectors.append(describer(data))
    frame = pd.DataFrame({"image": names, "descriptor": [np.asarray(v, np.float32) for v in vectors]})
    frame.to_parquet(root / "d.parquet")
    build_index(str(root / "d.parquet"), str(root / "index"), images_root=str(root / "photos"))
    web = WebServer(Searcher(Index.load(str(root / "index")), describer), 0)
    web.start()
    yield {"port": web.port, "names": names, "vectors": np.stack(vectors), "root": root, "describer": describer}
    web.shutdown()


def _multipart(fields):
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        body += b'; filename="query"\r\nContent-Type: application/octet-stream' if name == "image" else b""
        body += b"\r\n\r\n" + (value if isinstance(value, bytes) else str(value).encode()) + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(port, fields):
    body, kind = _multipart(fields)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/api/search", body=body, headers={"Content-Type": kind})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def _get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def test_search_api_ranks_as_numpy_does(site):
    query = (site["root"] / "photos" / site["names"][3]).read_bytes()
    status, answer = _post(site["port"], {"image": query, "top": 5})
    assert status == 200
    scores = site["vectors"] @ site["vectors"][3]
    order = np.argsort(-scores)[:5]
    assert [r["image"] for r in answer["results"]] == [site["names"][i] for i in order]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], scores[order], atol=1e-5)
    assert answer["results"][0]["image"] == site["names"][3]
    box = [5, 5, 50, 40]
    status, boxed = _post(site["port"], {"image": query, "box": ",".join(map(str, box))})
    cropped = site["describer"](query, [float(v) for v in box])
    expected = np.argsort(-(site["vectors"] @ cropped))
    assert status == 200 and [r["image"] for r in boxed["results"]] == [site["names"][i] for i in expected]


@pytest.mark.parametrize("fields, words", [
    ({"image": b"not an image at all"}, "not a readable image"),
    ({"top": 3}, "no query image"),
    ({"image": encoded(40, 40, 1), "box": "0,0,500,10"}, "not inside the 40x40"),
    ({"image": encoded(40, 40, 1), "box": "30,30,10,10"}, "covers no whole pixel"),  # reversed: answered 200
    ({"image": encoded(40, 40, 1), "box": "5.1,5.1,5.3,5.3"}, "covers no whole pixel"),
    ({"image": encoded(40, 40, 1), "box": "0,0,1e30,1e30"}, "not inside"),
    ({"image": encoded(40, 40, 1), "box": "0,0,nan,9"}, "not a finite number"),
    ({"image": encoded(40, 40, 1), "top": "many"}, "whole number"),
    ({"image": encoded(40, 40, 1), "top": 0}, "between 1 and"),
])
def test_bad_queries_get_400_with_the_reason(site, fields, words):
    status, answer = _post(site["port"], fields)
    assert status == 400 and words in answer["error"], answer


def test_images_are_served_for_indexed_names_only(site):
    status, data = _get(site["port"], "/images/" + site["names"][0].replace(" ", "%20"))
    assert status == 200 and data == (site["root"] / "photos" / site["names"][0]).read_bytes()
    for path in ("/images/..%2Fd.parquet", "/images/nothing.jpg", "/images/%2Fetc%2Fpasswd", "/elsewhere"):
        assert _get(site["port"], path)[0] == 404
    status, page = _get(site["port"], "/")
    assert status == 200 and b"api/search" in page


class _Results(html.parser.HTMLParser):
    """The result cards and the status line of a rendered page."""

    def __init__(self):
        super().__init__()
        self.results, self.status, self._in_status = [], "", False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "result" in (attrs.get("class") or "").split():
            self.results.append((attrs["data-image"], float(attrs["data-score"])))
        self._in_status = attrs.get("id") == "status"

    def handle_data(self, data):
        if self._in_status:
            self.status += data

    def handle_endtag(self, tag):
        self._in_status = False


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the browser test needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    return found


def test_the_page_searches_in_a_real_browser(site, tmp_path):
    name = site["names"][5]
    url = f"http://127.0.0.1:{site['port']}/?q={name.replace(' ', '%20')}&top=4"
    result = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000",
                             "--dump-dom", url], capture_output=True, text=True, timeout=240)
    page = _Results()
    page.feed(result.stdout)
    scores = site["vectors"] @ site["vectors"][5]
    order = np.argsort(-scores)[:4]
    assert [n for n, _ in page.results] == [site["names"][i] for i in order], (page.status, result.stderr[-500:])
    np.testing.assert_allclose([s for _, s in page.results], scores[order], atol=1e-5)
    assert page.status.strip() == "4 results"
    # the browser fetched each result's picture: the page's <img> points at served files
    assert result.stdout.count('src="images/sub%20folder%2Fphoto%20') == 4


@pytest.fixture
def files_site(tmp_path):
    """A page over an index whose names are an HTML-named JPEG and a text file named .jpg."""
    root = tmp_path / "photos"
    root.mkdir()
    jpeg = encoded(40, 40, 1)
    (root / "x.html").write_bytes(jpeg[:2] + b"\xff\xfe\x00\x1d<script>alert(1)</script>......" + jpeg[2:])
    (root / "notes.jpg").write_text("<html><script>alert(2)</script></html>")
    index = Index(4)
    index.add(np.eye(2, 4), ["x.html", "notes.jpg"])
    web = WebServer(Searcher(index, None, str(root)), 0)
    web.start()
    yield web.port
    web.shutdown()


def test_indexed_files_are_served_only_as_the_image_their_content_is(files_site):
    # x.html (a JPEG with a script in a comment) was served as text/html: a script on the page's origin.
    connection = http.client.HTTPConnection("127.0.0.1", files_site, timeout=10)
    connection.request("GET", "/images/x.html")
    response = connection.getresponse()
    response.read()
    assert response.status == 200 and response.getheader("Content-Type") == "image/jpeg"
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert response.getheader("Content-Security-Policy") == "sandbox"
    status, data = _get(files_site, "/images/notes.jpg")
    assert status == 415 and b"not an image" in data


def test_a_form_of_many_parts_is_refused_before_it_is_parsed(site):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\r\n" * 50_000
            + f"--{boundary}--\r\n").encode()
    connection = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=60)
    connection.request("POST", "/api/search", body=body,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = connection.getresponse()
    assert response.status == 400 and "more than 8 parts" in json.loads(response.read())["error"]


def test_a_quoted_boundary_parses():
    from serving.web import form_fields

    query = encoded(40, 40, 1)
    body = (b'--"x y"\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + query + b'\r\n--"x y"\r\n'
            b'Content-Disposition: form-data; name="top"\r\n\r\n3\r\n--"x y"--\r\n')
    body = body.replace(b'"x y"', b"x y")
    assert form_fields('multipart/form-data; boundary="x y"', body) == {"image": query, "top": b"3"}


def test_concurrent_searches_share_one_pixel_budget(tmp_path):
    import threading

    from PIL import Image

    from deep_retrieval.data.images import MAX_PIXELS

    big = tmp_path / "big.png"  # 8000 x 7000 = 56M declared pixels in a few kB
    Image.new("1", (8000, 7000)).save(big)
    data = big.read_bytes()
    peak, lock = [0], threading.Lock()
    searcher = None

    def describer(blob, box):
        with lock:
            peak[0] = max(peak[0], searcher.budget.used)
        time.sleep(0.3)
        return np.ones(4, np.float32)

    index = Index(4)
    index.add(np.eye(1, 4), ["a.jpg"])
    searcher = Searcher(index, describer, max_pixels_in_flight=MAX_PIXELS)
    threads = [threading.Thread(target=searcher.search, args=({"image": data},)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each upload of a 9000x9000 JPEG cost 1.2 GB at once, with no budget across requests; now they queue.
    assert peak[0] == 8000 * 7000 and searcher.budget.used == 0
