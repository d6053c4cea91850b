"""Writing files so that a crash never leaves a partial one."""

import contextlib
import csv
import fcntl
import glob
import os
import shutil
import threading


def atomic_write(path, write, suffix=""):
    """Calls ``write(tmp)`` on a temporary path beside ``path``, then
    renames it into place: a reader sees the old file or the new one, never
    a partial one, and a failed write leaves the old file and no temporary.

    An existing folder is swapped out by two renames (``path -> path.old``,
    then the new one in); a crash between them leaves ``path.old``, which
    the next call (and `deep_retrieval.retrieval.index.Index.load`) takes back.

    Args:
        path: the file or folder to write.
        write: a function writing to the path it is given.
        suffix: ending of the temporary name, for writers that choose the
            format by extension (``".keras"``, ``".npz"``).

    Returns:
        ``path``.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}")
    old = path.rstrip("/") + ".old"
    if not os.path.lexists(path) and os.path.isdir(old):
        os.replace(old, path)  # a folder swap killed between its renames: the previous one comes back
    try:
        write(tmp)
        if os.path.isdir(path) and not os.path.islink(path):  # a folder cannot be replaced in one rename
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_text(path, text):
    """Writes ``text`` (UTF-8) to ``path`` with `atomic_write`."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_csv(path, frame):
    """Writes a pandas frame as CSV with `atomic_write`, every text field
    quoted: a name holding a carriage return, which pandas leaves unquoted
    otherwise, stays in its row."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC))


@contextlib.contextmanager
def exclusive_lock(path, busy):
    """Holds an exclusive lock on the file ``path`` (created if missing) for
    the block; ``busy`` is the ValueError message when another process
    holds it. The lock goes with the process: a killed holder frees it."""
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(busy) from None
    try:
        yield handle
    finally:
        handle.close()


def remove_stale_temporaries(path):
    """Removes the temporaries `atomic_write` left beside ``path`` in
    processes that were killed (SIGKILL runs no cleanup). Only for a caller
    that holds ``path``'s `exclusive_lock`: no other writer is running."""
    folder, name = os.path.split(os.path.abspath(path.rstrip("/")))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.tmp-*")):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(tmp)
