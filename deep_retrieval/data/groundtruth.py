"""Retrieval benchmarks on disk: the Revisited Oxford/Paris layout.

A dataset ``NAME`` lives in ``DATA_ROOT/NAME/`` with images in ``jpg/`` and
ground truth in ``gnd_NAME.pkl``: ``imlist`` (database image names),
``qimlist`` (query names) and ``gnd``, one dict per query with ``bbx`` (query
box ``x0, y0, x1, y1``) and index arrays into ``imlist``: ``easy``, ``hard``,
``junk`` (Revisited), or ``good``, ``ok``, ``junk`` (original Oxford/Paris),
or ``ok`` (Holidays).

Holidays-style benchmarks list their queries among the database images
(``qimlist`` names found in ``imlist``): `RetrievalDataset.query_indices`
records where, and evaluation then removes each query from its own ranking
(the ``holidays`` protocol). Many Holidays photos are stored sideways; the
published results use them turned upright. An optional ``rotate`` entry,
``{image name: degrees clockwise}`` (90, 180 or 270), turns those images:
the upright copies are written once, losslessly (PNG), under
``NAME/upright/`` and used in their place.

Ground-truth pickles are untrusted input: `load_groundtruth` unpickles them
with `SafeUnpickler`, which builds only builtin containers and numpy arrays
and refuses every other global, so a crafted pickle cannot run code; its
opcodes are walked first (`deep_retrieval.io.torch_pickle.check_pickle`: memo
indices in sequence, bounded nesting), so it cannot make the unpickler
allocate what the file does not hold.
"""

import dataclasses
import io
import os
import pickle

from PIL import Image

from deep_retrieval.io.atomic import atomic_write

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
    for name in ("dict", "list", "tuple", "set", "frozenset")
}


def _empty(kind):
    """``bytes()`` / ``bytearray()`` as protocol-2 pickles hold an empty
    buffer; with an argument (``bytes(2**40)`` allocates) it is refused."""

    def build(*args):
        if args and not (len(args) == 2 and isinstance(args[0], str)):  # (text, encoding): bounded by the file
            raise pickle.UnpicklingError(f"refused {kind.__name__}() with arguments")
        return kind(*args)

    return build


_BUFFERS = {(module, kind.__name__): _empty(kind) for module in ("builtins", "__builtin__")
            for kind in (bytes, bytearray)}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings, numbers and numpy arrays only."""

    def find_class(self, module, name):
        if (module, name) in _BUFFERS:
            return _BUFFERS[(module, name)]
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: ground-truth files may only hold "
            "lists, dicts, strings, numbers and numpy arrays"
        )


def safe_load(data):
    """`pickle.loads` through `SafeUnpickler` (``latin1`` for Python 2
    pickles), once `check_pickle` has walked it."""
    from deep_retrieval.io.torch_pickle import check_pickle

    stream = io.BytesIO(data)
    check_pickle(stream, "the pickle")
    return SafeUnpickler(stream, encoding="latin1").load()


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
    query_indices: list = None
    """Database index of each query (None: not a database image)."""


_TURNS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def upright_copy(source, degrees, folder):
    """``source`` turned ``degrees`` clockwise, written once as PNG in
    ``folder`` (atomically; redone when the source is newer)."""
    if int(degrees) % 360 == 0:
        return source
    if int(degrees) % 360 not in _TURNS:
        raise ValueError(f"{source}: rotation {degrees} is not a multiple of 90 degrees")
    target = os.path.join(folder, os.path.basename(source) + ".png")
    if os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(source):
        return target
    os.makedirs(folder, exist_ok=True)

    def write(tmp):
        with Image.open(source) as im:
            im.convert("RGB").transpose(_TURNS[int(degrees) % 360]).save(tmp, "PNG")

    try:
        return atomic_write(target, write)
    except OSError as e:
        raise ValueError(f"{source}: cannot turn the image upright: {e}") from e


def load_dataset(data_root, name, ext=".jpg"):
    """Loads ``data_root/name`` (see the module docstring)."""
    folder = os.path.join(data_root, name)
    gnd_path = os.path.join(folder, f"gnd_{name}.pkl")
    cfg = load_groundtruth(gnd_path)
    jpg = os.path.join(folder, "jpg")
    rotate = cfg.get("rotate") or {}
    if not isinstance(rotate, dict):
        raise ValueError(f"{gnd_path}: 'rotate' must map image names to degrees clockwise")

    def path(n):
        p = os.path.join(jpg, n if os.path.splitext(n)[1] else n + ext)
        return upright_copy(p, rotate[n], os.path.join(folder, "upright")) if rotate.get(n) else p

    boxes = [
        None if g.get("bbx") is None else tuple(float(v) for v in g["bbx"])
        for g in cfg["gnd"]
    ]
    for n, box in zip(cfg["qimlist"], boxes):
        if box is not None and rotate.get(n):
            raise ValueError(f"{gnd_path}: query {n} has both a box and a rotation")
    where = {n: i for i, n in enumerate(cfg["imlist"])}
    return RetrievalDataset(
        name=name,
        images=[path(n) for n in cfg["imlist"]],
        queries=[path(n) for n in cfg["qimlist"]],
        query_boxes=boxes,
        gnd=list(cfg["gnd"]),
        query_indices=[where.get(n) for n in cfg["qimlist"]],
    )
