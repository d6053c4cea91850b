"""The retrieval benchmarks fetched from their publishers into the
`groundtruth` layout (``DATA_ROOT/NAME/jpg/`` and ``gnd_NAME.pkl``).

Oxford5k/Paris6k images come from the Oxford VGG group's archives and their
(Revisited) ground truth from Radenović et al.'s server, both as
cirtorch's ``download_test`` fetches them
(filipradenovic/cnnimageretrieval-pytorch, ``cirtorch/utils/download.py``):
the archives' images are written flat into ``jpg/``. INRIA Holidays comes
from Jégou et al.'s FTP server (https://thoth.inrialpes.fr/~jegou/data.php.html,
``jpg1.tar.gz`` and ``jpg2.tar.gz``); its ground truth is the published
protocol's grouping by file name (``NNNNxx.jpg``: the ``NNNN00`` image is the
query, the others of its group are its positives), written as
``gnd_holidays.pkl``. The publishers record no checksums; each archive is
kept in ``DATA_ROOT/.downloads`` (resumable) and unpacked with
`download.extract`, which refuses links and members outside the folder.
"""

import os
import pickle
import posixpath

from deep_retrieval.data import groundtruth
from deep_retrieval.io import download
from deep_retrieval.io.atomic import atomic_write

OXFORD = "http://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
PARIS = "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
GROUND_TRUTH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test"
HOLIDAYS = "ftp://ftp.inrialpes.fr/pub/lear/douze/data"

BENCHMARKS = {
    "oxford5k": {"archives": [f"{OXFORD}/oxbuild_images-v1.tgz"], "gnd": f"{GROUND_TRUTH}/oxford5k/gnd_oxford5k.pkl"},
    "roxford5k": {"archives": [f"{OXFORD}/oxbuild_images-v1.tgz"],
                  "gnd": f"{GROUND_TRUTH}/roxford5k/gnd_roxford5k.pkl"},
    "paris6k": {"archives": [f"{PARIS}/paris_1-v1.tgz", f"{PARIS}/paris_2-v1.tgz"],
                "gnd": f"{GROUND_TRUTH}/paris6k/gnd_paris6k.pkl"},
    "rparis6k": {"archives": [f"{PARIS}/paris_1-v1.tgz", f"{PARIS}/paris_2-v1.tgz"],
                 "gnd": f"{GROUND_TRUTH}/rparis6k/gnd_rparis6k.pkl"},
    "holidays": {"archives": [f"{HOLIDAYS}/jpg1.tar.gz", f"{HOLIDAYS}/jpg2.tar.gz"], "gnd": None},
}


def _is_image(name):
    return name.lower().endswith((".jpg", ".jpeg"))


def holidays_groundtruth(names):
    """Holidays' ground truth from its image names (``NNNNxx.jpg``): one
    query per group, the ``xx == 00`` image; its positives are the group's
    other images (the query itself is removed at evaluation)."""
    stems = sorted(os.path.splitext(n)[0] for n in names)
    groups = {}
    for index, stem in enumerate(stems):
        groups.setdefault(stem[:-2], []).append(index)
    queries = [stem for stem in stems if stem.endswith("00")]
    gnd = [{"ok": [i for i in groups[q[:-2]] if stems[i] != q]} for q in queries]
    return {"imlist": stems, "qimlist": queries, "gnd": gnd}


def download_benchmark(name, data_root, progress=True):
    """Fetches benchmark ``name`` into ``data_root/name`` unless it is there.

    Returns:
        The dataset's folder.

    Raises:
        ValueError: an unknown name, an unsafe or damaged archive, a ground
            truth that does not load; `download.DownloadError` when a file
            cannot be fetched (the message gives the URL and where to put it).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"--download: no publisher recorded for {name!r}; choose one of {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    folder = os.path.join(data_root, name)
    cache = os.path.join(data_root, ".downloads")
    jpg = os.path.join(folder, "jpg")
    if not os.path.isdir(jpg):
        archives = []
        for url in spec["archives"]:
            path = os.path.join(cache, posixpath.basename(url))
            download.fetch(url, path, None, progress=progress)
            archives.append(path)
        download.extract(archives, jpg, flatten=True, keep=_is_image, progress=progress)
    gnd_path = os.path.join(folder, f"gnd_{name}.pkl")
    if not os.path.isfile(gnd_path):
        if spec["gnd"] is None:
            cfg = holidays_groundtruth(os.listdir(jpg))
            atomic_write(gnd_path, lambda tmp: _write_pickle(tmp, cfg))
        else:
            download.fetch(spec["gnd"], gnd_path, None, progress=progress)
    groundtruth.load_dataset(data_root, name)  # a ground truth that names missing images fails here
    return folder


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
