"""Retrieval benchmarks on disk: the Revisited Oxford/Paris layout.

A dataset ``NAME`` lives in ``DATA_ROOT/NAME/`` with images in ``jpg/`` and
ground truth in ``gnd_NAME.pkl``: ``imlist`` (database image names),
``qimlist`` (query names) and ``gnd``, one dict per query with ``bbx`` (query
box ``x0, y0, x1, y1``) and index arrays into ``imlist``: ``easy``, ``hard``,
``junk`` (Revisited), or ``good``, ``ok``, ``junk`` (original Oxford/Paris),
or ``ok`` (Holidays).

Ground-truth pickles are untrusted input: `load_groundtruth` unpickles them
with `SafeUnpickler`, which builds only builtin containers and numpy arrays
and refuses every other global, so a crafted pickle cannot run code.
"""

import dataclasses
import io
import os
import pickle

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
} | {
    (module, name)
    for module in ("builtins", "__builtin__")  # Python 3 and 2 pickles
    for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray")
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings, numbers and numpy arrays only."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: ground-truth files may only hold "
            "lists, dicts, strings, numbers and numpy arrays"
        )


def safe_load(data):
    """`pickle.loads` through `SafeUnpickler` (``latin1`` for Python 2 pickles)."""
    return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_groundtruth(path):
    """Reads a ``gnd_*.pkl`` file safely; raises ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            cfg = safe_load(f.read())
    except FileNotFoundError:
        raise ValueError(f"{path}: ground-truth file not found") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot load ground truth: {e}") from e
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(
            f"{path}: {len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries"
        )
    return cfg


@dataclasses.dataclass
class RetrievalDataset:
    """A benchmark: database and query image paths, query boxes, ground truth."""

    name: str
    images: list
    queries: list
    query_boxes: list
    gnd: list


def load_dataset(data_root, name, ext=".jpg"):
    """Loads ``data_root/name`` (see the module docstring)."""
    folder = os.path.join(data_root, name)
    cfg = load_groundtruth(os.path.join(folder, f"gnd_{name}.pkl"))
    jpg = os.path.join(folder, "jpg")

    def path(n):
        return os.path.join(jpg, n if os.path.splitext(n)[1] else n + ext)

    boxes = [
        None if g.get("bbx") is None else tuple(float(v) for v in g["bbx"])
        for g in cfg["gnd"]
    ]
    return RetrievalDataset(
        name=name,
        images=[path(n) for n in cfg["imlist"]],
        queries=[path(n) for n in cfg["qimlist"]],
        query_boxes=boxes,
        gnd=list(cfg["gnd"]),
    )
