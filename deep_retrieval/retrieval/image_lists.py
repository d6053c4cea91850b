"""The images of a batch extraction: a folder walked or a CSV read, their
names made printable, each file read at most once and never blocking."""

import os
import sys

from deep_retrieval.data.images import EXTENSIONS, file_problem


def printable_name(name):
    """A file name as printable UTF-8 text, one to one: bytes that are not
    UTF-8 (kept by Python as surrogate escapes) and control characters
    (``\\r``, ``\\n``, ...) are written as ``\\xNN``, and a backslash as
    ``\\\\``, so no two names map to one and no name splits a CSV row."""
    out = []
    for ch in name:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def list_images(source, data_dir=None):
    """``([(name, path)], [(name, reason)])``: the images of a folder walked
    recursively (sorted) or of a CSV, and the files a folder walk skipped.

    Raises ValueError when there is no image to extract.
    """
    import pandas as pd

    if os.path.isdir(source):
        out, skipped = [], []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                shown = printable_name(os.path.relpath(path, source))
                if name.lower().endswith(EXTENSIONS):
                    out.append((shown, path))
                else:
                    ending = os.path.splitext(name)[1].lower() or "no extension"
                    skipped.append((shown, f"{ending}: not an image type the model decodes ({', '.join(EXTENSIONS)})"))
        if not out:
            raise ValueError(f"{source}: no images ({', '.join(EXTENSIONS)}) in the folder or its subfolders"
                             + (f"; {len(skipped)} other files skipped" if skipped else ""))
        return out, skipped
    if not os.path.isfile(source):
        raise ValueError(f"{source}: no such folder or CSV file")
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)  # names verbatim: 007, 1e5, NA
    except pd.errors.EmptyDataError:
        raise ValueError(f"{source}: the CSV is empty; it needs an 'image' column") from None
    except Exception as e:
        raise ValueError(f"{source}: cannot read CSV: {e}") from e
    if "image" not in frame.columns:
        raise ValueError(f"{source}: the CSV needs an 'image' column")
    if frame.empty:
        raise ValueError(f"{source}: the CSV lists no images")
    base = data_dir or os.path.dirname(os.path.abspath(source))
    names = [str(v) for v in frame["image"].tolist()]
    return [(n, n if os.path.isabs(n) else os.path.join(base, n)) for n in names], []


def check_unique(items):
    """The names of ``items`` (``[(name, path)]``); a ValueError when one repeats."""
    names = [n for n, _ in items]
    duplicates = len(names) - len(set(names))
    if duplicates:
        raise ValueError(f"{duplicates} duplicate image names in the input; each image must appear once")
    return names


def report_skipped(skipped, stream=sys.stderr, shown=5):
    """Prints how many files a folder walk skipped, with the first few and why."""
    if skipped:
        print(f"skipped {len(skipped)} files that are not images:", file=stream)
        for name, reason in skipped[:shown]:
            print(f"  {name}: {reason}", file=stream)
        if len(skipped) > shown:
            print(f"  ... and {len(skipped) - shown} more", file=stream)


def read_file(path, max_bytes, limit="--max_message_bytes"):
    """The file's bytes, or the exception saying why not: only regular files
    are read (a FIFO would block, ``/dev/zero`` never ends), at most
    ``max_bytes`` (what one gRPC message can carry; ``limit`` names it)."""
    problem = file_problem(path, max_bytes, limit)
    if problem:
        return OSError(problem)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            return OSError(f"more than {limit} {max_bytes} bytes")
        return data
    except OSError as e:
        return e
