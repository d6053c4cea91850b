"""Fetching published files: resumable downloads checked against a recorded
SHA-256, and archives unpacked without trusting their member names.

A download goes to ``PATH.part`` and is renamed to ``PATH`` only once whole
and verified, so ``PATH`` is never a partial or unverified file. An
interrupted download is resumed from the ``.part`` file's length with an
HTTP ``Range`` request (a server that ignores it sends the whole file, which
then replaces the part). A file that fails its checksum is removed.

Archives are untrusted input: a member with an absolute name, a ``..``
component, or that is a link, device or FIFO is refused before anything is
written, and members are unpacked into a temporary folder beside the target
that replaces it whole (`atomic_write`).
"""

import contextlib
import hashlib
import http.client
import os
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

from deep_retrieval.io.atomic import atomic_write

CHUNK = 1 << 20
USER_AGENT = "deep-retrieval"


class DownloadError(ValueError):
    """A file could not be fetched or failed its checksum; the message says
    which URL to fetch by hand and where to put it."""


def cache_dir(kind):
    """``$KERAS_HOME/deep_retrieval/KIND`` (``~/.keras`` without
    ``KERAS_HOME``, as Keras's own cache): where published networks
    (``published``) and benchmarks (``datasets``) are kept."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "deep_retrieval", kind)


def sha256_of(path):
    """The hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path, sha256, source):
    """Raises DownloadError unless ``path``'s SHA-256 starts with ``sha256``
    (a full hash, or the prefix torch.hub's file names carry); None checks
    nothing. Returns the file's SHA-256."""
    got = sha256_of(path)
    if sha256 and not got.startswith(sha256.lower()):
        raise DownloadError(f"{path}: SHA-256 {got} does not match the recorded {sha256} for {source}")
    return got


def _open(url, offset, timeout):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (URLs come from the project's tables)


def fetch(url, path, sha256=None, progress=True, timeout=60):
    """Downloads ``url`` to ``path``, resuming a ``.part`` file left by an
    interrupted call, and checks its SHA-256.

    Args:
        url: an ``http(s)://`` or ``ftp://`` URL (FTP restarts instead of
            resuming).
        path: where the file goes. An existing file is checked and kept: no
            network is used.
        sha256: the recorded hex SHA-256 (or a prefix of it), or None where
            the publisher records none.
        progress: show a progress bar.
        timeout: seconds to wait for the server.

    Returns:
        The file's hex SHA-256.

    Raises:
        DownloadError: the server could not be reached or answered an
            error, the body was short, or the checksum failed (the bad file
            is removed); the message names the URL and the path.
    """
    by_hand = f"fetch {url} by hand and put it at {path}"
    if os.path.isfile(path):
        try:
            return check_sha256(path, sha256, url)
        except DownloadError as e:
            raise DownloadError(f"{e}: remove it, or {by_hand}") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part already holds the whole file
            return _finish(part, path, sha256, url, by_hand)
        raise DownloadError(f"{url}: the server answered {e.code} {e.reason}; {by_hand}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: could not connect ({reason}); {by_hand}") from None
    with response:
        if (response.headers.get("Content-Type") or "").startswith("text/html"):
            raise DownloadError(f"{url}: the server sent a web page, not the file (a sign-in, quota or "
                                f"confirmation page); {by_hand}")
        resumed = offset and getattr(response, "status", 200) == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        name = os.path.basename(path)
        with open(part, "ab" if resumed else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name,
                     disable=not progress) as bar:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: the transfer broke off ({e}); run again to resume, or "
                                    f"{by_hand}") from None
    if total is not None and os.path.getsize(part) < total:
        raise DownloadError(f"{url}: got {os.path.getsize(part)} of {total} bytes; run again to resume, or "
                            f"{by_hand}")
    return _finish(part, path, sha256, url, by_hand)


def _finish(part, path, sha256, url, by_hand):
    try:
        got = check_sha256(part, sha256, url)
    except DownloadError as e:
        os.remove(part)
        raise DownloadError(f"{e}; the download was removed: run again, or {by_hand}") from None
    os.replace(part, path)
    return got


@contextlib.contextmanager
def _members(archive):
    """The open archive as a list of ``(name, opener)``, one per regular
    file, after refusing the whole archive if any member is unsafe."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            for info in infos:
                kind = (info.external_attr >> 16) & 0o170000
                if kind not in (0, 0o100000, 0o040000):
                    raise ValueError(f"{archive}: member {info.filename!r} is a link or special file")
                _safe_name(archive, info.filename)
            yield [(i.filename, lambda i=i: z.open(i)) for i in infos if not i.is_dir()]
        return
    try:
        tar = tarfile.open(archive)
    except tarfile.TarError as e:
        raise ValueError(f"{archive}: not a tar or zip archive ({e})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{archive}: damaged archive ({e})") from None
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: member {m.name!r} is a link or special file")
            _safe_name(archive, m.name)
        yield [(m.name, lambda m=m: tar.extractfile(m)) for m in members if m.isfile()]


def _safe_name(archive, name):
    normal = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or normal == ".." or normal.startswith("../") or ":" in normal.split("/")[0]:
        raise ValueError(f"{archive}: member {name!r} would be written outside the target folder")
    return normal


def extract(archives, folder, flatten=False, keep=None, progress=True):
    """Unpacks the regular files of tar (any compression) or zip archives
    into ``folder``, which is replaced whole once every member is written.

    Args:
        archives: an archive's path, or a list of them (unpacked together,
            as Paris6k's two parts).
        folder: the target folder (created; an existing one is replaced).
        flatten: write every file at the top of ``folder`` under its base
            name (as cirtorch's downloader does with the Oxford and Paris
            images); two members with one base name are refused.
        keep: a function of a member's name, False for members to skip.
        progress: show a progress bar.

    Returns:
        The names written, relative to ``folder``.

    Raises:
        ValueError: an unsafe member (absolute, ``..``, link, device) or a
            damaged archive, naming the archive; nothing is written then.
    """
    archives = [archives] if isinstance(archives, (str, os.PathLike)) else list(archives)
    written = []

    def write(tmp):
        os.makedirs(tmp)
        for archive in archives:
            _unpack(archive, tmp, flatten, keep, progress, written)

    atomic_write(folder, write)
    return written


def _unpack(archive, tmp, flatten, keep, progress, written):
    with _members(archive) as members, tqdm(total=len(members), unit="file", desc=os.path.basename(archive),
                                            disable=not progress) as bar:
        for name, reader in members:
            bar.update(1)
            normal = _safe_name(archive, name)
            if keep is not None and not keep(normal):
                continue
            relative = posixpath.basename(normal) if flatten else normal
            target = os.path.join(tmp, *relative.split("/"))
            if os.path.exists(target):
                raise ValueError(f"{archive}: two members are written to {relative!r}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                with reader() as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
                raise ValueError(f"{archive}: member {name!r} is damaged ({e})") from None
            written.append(relative)
