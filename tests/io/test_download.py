"""Downloads against a loopback server: resume, checksum refusal, cache hits
without network, offline errors; archives with unsafe members refused."""

import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from deep_retrieval.io import download
from tests.helpers_http import serving

BODY = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BODY).hexdigest()


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".part") or ".tmp-" in n)


def test_fetch_verifies_and_a_cached_file_needs_no_network(tmp_path):
    path = str(tmp_path / "net.pth")
    with serving({"/net.pth": BODY}) as (url, state):
        assert download.fetch(url + "/net.pth", path, SHA, progress=False) == SHA
        assert open(path, "rb").read() == BODY and _leftovers(tmp_path) == []
        # A torch.hub-style prefix is accepted as the recorded hash.
        assert download.fetch(url + "/net.pth", path, SHA[:7], progress=False) == SHA
        assert len(state.requests) == 1  # the second call found the file


def test_an_interrupted_download_resumes_from_its_part(tmp_path):
    path = str(tmp_path / "net.pth")
    with serving({"/net.pth": BODY}) as (url, state):
        state.break_after = 300_000
        with pytest.raises(download.DownloadError, match="run again to resume"):
            download.fetch(url + "/net.pth", path, SHA, progress=False)
        assert not os.path.exists(path) and os.path.getsize(path + ".part") == 300_000
        state.break_after = None
        assert download.fetch(url + "/net.pth", path, SHA, progress=False) == SHA
        assert state.requests[-1] == ("/net.pth", "bytes=300000-")
    assert open(path, "rb").read() == BODY and _leftovers(tmp_path) == []


def test_a_server_ignoring_range_restarts_the_file(tmp_path):
    path = str(tmp_path / "net.pth")
    with open(path + ".part", "wb") as f:
        f.write(b"stale bytes from another file")
    with serving({"/net.pth": BODY}) as (url, state):
        state.honour_range = False
        assert download.fetch(url + "/net.pth", path, SHA, progress=False) == SHA
    assert open(path, "rb").read() == BODY


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(tmp_path):
    path = str(tmp_path / "net.pth")
    with serving({"/net.pth": BODY[:-1] + b"x"}) as (url, _):
        with pytest.raises(download.DownloadError, match="does not match the recorded") as error:
            download.fetch(url + "/net.pth", path, SHA, progress=False)
    assert path in str(error.value) and "by hand" in str(error.value)
    assert os.listdir(tmp_path) == []
    # A cached file that does not match is reported, not silently used.
    with open(path, "wb") as f:
        f.write(b"not the network")
    with pytest.raises(download.DownloadError, match="remove it"):
        download.fetch("http://127.0.0.1:9/net.pth", path, SHA, progress=False)


def test_offline_the_error_says_what_to_fetch_and_where(tmp_path):
    path = str(tmp_path / "cache" / "Resnet101-AP-GeM.pt")
    with serving({}) as (url, _):
        closed = url  # the port is closed once the server stops
    with pytest.raises(download.DownloadError) as error:
        download.fetch(closed + "/Resnet101-AP-GeM.pt", path, None, progress=False, timeout=5)
    message = str(error.value)
    assert "could not connect" in message and closed + "/Resnet101-AP-GeM.pt" in message and path in message
    with serving({"/drive": b"<html>Google Drive can't scan this file</html>"}) as (url, state):
        with pytest.raises(download.DownloadError, match="answered 404"):
            download.fetch(url + "/missing.pt", path, None, progress=False)
        state.content_type = "text/html; charset=utf-8"  # a quota or sign-in page in the file's place
        with pytest.raises(download.DownloadError, match="sent a web page, not the file"):
            download.fetch(url + "/drive", path, None, progress=False)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def _tar(path, members):
    """``members``: (name, bytes) for files, (name, "->target") for symlinks."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("members, reason", [
    ([("jpg/a.jpg", b"a"), ("../evil.txt", b"x")], "outside the target folder"),
    ([("/etc/evil", b"x")], "outside the target folder"),
    ([("jpg/a.jpg", b"a"), ("jpg/link", "->/etc/passwd")], "link or special file"),
])
def test_unsafe_tar_members_are_refused_before_anything_is_written(tmp_path, members, reason):
    archive = str(tmp_path / "evil.tgz")
    _tar(archive, members)
    target = tmp_path / "data" / "jpg"
    with pytest.raises(ValueError, match=reason):
        download.extract(archive, str(target), progress=False)
    assert not target.exists() and not (tmp_path / "evil.txt").exists()
    assert [n for n in os.listdir(tmp_path) if n != "evil.tgz"] in ([], ["data"])
    if (tmp_path / "data").exists():
        assert os.listdir(tmp_path / "data") == []


def test_zip_with_a_parent_member_is_refused(tmp_path):
    archive = str(tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr("../../evil.txt", "x")
    with pytest.raises(ValueError, match="outside the target folder"):
        download.extract(archive, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_extract_flattens_and_replaces_the_folder_whole(tmp_path):
    archive = str(tmp_path / "oxbuild_images-v1.tgz")
    _tar(archive, [("oxbuild_images/all_souls_000001.jpg", b"1"), ("oxbuild_images/sub/radcliffe_000002.jpg", b"2"),
                   ("README", b"r")])
    target = tmp_path / "oxford5k" / "jpg"
    target.mkdir(parents=True)
    (target / "stale.jpg").write_bytes(b"old")
    names = download.extract(archive, str(target), flatten=True, keep=lambda n: n.endswith(".jpg"), progress=False)
    assert sorted(names) == ["all_souls_000001.jpg", "radcliffe_000002.jpg"]
    assert sorted(os.listdir(target)) == ["all_souls_000001.jpg", "radcliffe_000002.jpg"]
    twice = str(tmp_path / "twice.tgz")
    _tar(twice, [("a/x.jpg", b"1"), ("b/x.jpg", b"2")])
    with pytest.raises(ValueError, match="two members"):
        download.extract(twice, str(tmp_path / "t"), flatten=True, progress=False)
    assert not (tmp_path / "t").exists()
