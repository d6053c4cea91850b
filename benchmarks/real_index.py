"""The ``ivfpq`` index on descriptors of real photographs: recall@10 and mAP
against exact search, build time and peak RSS.

The collection is made of views (`deep_retrieval.data.views.photo_view`) of
the built-in dataset's photographs (`deep_retrieval.data.landmarks.Photos`
and `Scenes`: every training, held-out and validation instance photo), one
in ``--distractor_share`` a landmark-free view of a distractor photo. Each
is described by ImageNet EfficientNet-Lite0 R-MAC (3 levels, one scale,
``--width`` x 3/4 pixels: what two cores describe at about 80 images/s),
PCA-whitened to 512-D on views of other seeds, and written as Parquet
shards as `serving.extract` writes them. The descriptors are cached under
``--folder`` (a shard at a time: a killed run resumes); the first run takes
about 25 minutes on two AVX2 cores.

Then it runs ``python -m serving.index --kind ivfpq`` (the defaults: factory
for the collection size, nprobe, k_factor) as its own process, sampling
its memory, and searches ``--queries`` views not in the collection (other
seeds, two per instance photo) exactly and, at the default nprobe and at
``--nprobes``, with the codes' own order (k_factor 1) and with the default
re-ranking. Prints for each q/s and recall@10 against exact search of a
search for 10, and mAP@100 of a search for 100 (the positives of a query:
the views of its photo).

    python benchmarks/real_index.py [--count 102400] [--folder ~/.keras/datasets/deep_retrieval/real_index]
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

WHITENING_VIEWS = 4096
SEED = 20261207


def _renderers():
    """``(instances, distractors, difficulty)``: a renderer per instance photo
    in a fixed order, ``render(rng, size, difficulty)``; the two distractor
    sources, ``view(rng, size, number)``; the database views' difficulty
    range."""
    from deep_retrieval.config import SyntheticConfig
    from deep_retrieval.data.landmarks import Photos, Scenes

    config = SyntheticConfig(surroundings=0)  # every training-source photo an instance, as measured
    photos, scenes = Photos(config), Scenes(config)
    instances = ([photos.landmark("train", i) for i in range(photos.counts["train"])]
                 + [photos.landmark("test", i) for i in range(photos.counts["test"])]
                 + [scenes.landmark("test", i) for i in range(scenes.counts["test"])])
    distractors = [lambda rng, size, i: photos.background(rng, size, i, "test"),
                   lambda rng, size, i: scenes.background(rng, size, i, "test")]
    return instances, distractors, Photos.difficulty


_STATE = {}


def _init_worker(width):
    _STATE["renderers"] = _renderers()
    _STATE["size"] = (width, width * 3 // 4)


def _render(items):
    """``[n, h, w, 3]`` uint8 views of ``items``: ``(tag, label, k)``, label
    -1 for a distractor view (``k`` its number)."""
    instances, distractors, difficulty = _STATE["renderers"]
    size = _STATE["size"]
    out = []
    for tag, label, k in items:
        rng = np.random.default_rng([SEED, tag, label + 1, k])
        if label < 0:
            image = distractors[k % 2](rng, size, k // 2)
        else:
            image = instances[label](rng, size, 0.1 if tag == 2 else rng.uniform(*difficulty))[0]
        out.append(np.asarray(image, dtype=np.uint8))
    return np.stack(out)


def plan(count, instances, distractor_share):
    """``(tag, label, k)`` of the collection's views: instance views in
    turn over the photos, every ``1 / distractor_share``-th a distractor."""
    every = int(round(1 / distractor_share)) if distractor_share else 0
    items, per_photo, distractor = [], np.zeros(instances, int), 0
    for j in range(count):
        if every and j % every == every - 1:
            items.append((1, -1, distractor))
            distractor += 1
        else:
            label = j % instances
            items.append((1, label, int(per_photo[label])))
            per_photo[label] += 1
    return items


class Extractor:
    """Renders in a worker process while the model describes in this one."""

    def __init__(self, width, batch=64):
        self.batch = batch
        self.pool = multiprocessing.get_context("spawn").Pool(1, _init_worker, (width,))

    def describe(self, items, model, progress):
        chunks = [items[i:i + self.batch] for i in range(0, len(items), self.batch)]
        pending, out = [], []
        for chunk in chunks[:3]:
            pending.append(self.pool.apply_async(_render, (chunk,)))
        for i in range(len(chunks)):
            images = pending.pop(0).get()
            if i + 3 < len(chunks):
                pending.append(self.pool.apply_async(_render, (chunks[i + 3],)))
            out.append(model(images.astype(np.float32)).numpy())
            progress.update(len(images))
        return np.concatenate(out)


def name_of(item):
    tag, label, k = item
    kind = {1: "db", 2: "query"}[tag]
    return f"{kind}/distractor/{k:06d}.jpg" if label < 0 else f"{kind}/{label:04d}/{k:04d}.jpg"


def label_of(name):
    part = name.split("/")[1]
    return -1 if part == "distractor" else int(part)


def extract(args):
    """Writes (or finds) ``folder/shards/*.parquet``, ``folder/queries.parquet``."""
    import tensorflow as tf
    from index_build import write_shard
    from tqdm import tqdm

    from deep_retrieval.config import DescriptorConfig
    from deep_retrieval.model.descriptor_model import build_descriptor_model
    from deep_retrieval.model.whitening import fit_pca_whitening
    from deep_retrieval.retrieval.descriptor_files import shard_name
    from deep_retrieval.retrieval.reranking import normalize

    folder = args.folder
    shards_dir = os.path.join(folder, "shards")
    os.makedirs(shards_dir, exist_ok=True)
    wanted = {"count": -(-args.count // args.shard_rows) * args.shard_rows, "shard_rows": args.shard_rows,
              "width": args.width, "distractor_share": args.distractor_share, "seed": SEED,
              "model": "efficientnet_lite0 imagenet R-MAC L=3, one scale, PCA-whitened to 512"}
    record = os.path.join(folder, "collection.json")
    if os.path.exists(record):
        with open(record) as f:
            held = json.load(f)
        if held != wanted:
            sys.exit(f"{folder} caches another collection ({held}); remove it or pass another --folder")
    else:
        with open(record, "w") as f:
            json.dump(wanted, f, indent=1)
    shards = -(-args.count // args.shard_rows)
    queries_path = os.path.join(folder, "queries.parquet")
    missing = [i for i in range(shards) if not os.path.exists(os.path.join(shards_dir, shard_name(i, shards)))]
    if not missing and os.path.exists(queries_path):
        return
    extractor = Extractor(args.width)
    instances = extractor.pool.apply(_count_instances)
    config = DescriptorConfig(backbone="efficientnet_lite0", weights="imagenet", levels=3, whitening_dim=None,
                              scales=(1.0,))
    network = build_descriptor_model(config, image_size=args.width)
    model = tf.function(lambda x: network(x))
    whitening_path = os.path.join(folder, "whitening.npz")
    todo = len(missing) * args.shard_rows + 2 * instances + (0 if os.path.exists(whitening_path) else WHITENING_VIEWS)
    with tqdm(total=todo, unit="img", desc="describe") as bar:
        if not os.path.exists(whitening_path):
            items = [(3, j % instances, j // instances) for j in range(WHITENING_VIEWS)]
            mean, projection = fit_pca_whitening(extractor.describe(items, model, bar), 512)
            np.savez(whitening_path + ".tmp.npz", mean=mean, projection=projection)
            os.replace(whitening_path + ".tmp.npz", whitening_path)
        w = np.load(whitening_path)

        def whiten(x):
            return normalize((x - w["mean"]) @ w["projection"])

        items = plan(shards * args.shard_rows, instances, args.distractor_share)
        for i in missing:
            part = items[i * args.shard_rows:(i + 1) * args.shard_rows]
            write_shard(os.path.join(shards_dir, shard_name(i, shards)), [name_of(t) for t in part],
                        whiten(extractor.describe(part, model, bar)))
        if not os.path.exists(queries_path):
            part = [(2, label, k) for k in range(2) for label in range(instances)]
            write_shard(queries_path, [name_of(t) for t in part], whiten(extractor.describe(part, model, bar)))
    extractor.pool.close()


def _count_instances():
    return len(_STATE["renderers"][0])


def average_precision_at(ranked_labels, label, positives, depth=100):
    """AP over the first ``depth`` results, normalised by min(positives, depth)."""
    hits = np.asarray(ranked_labels[:depth]) == label
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / min(positives, depth))


def evaluate(args):
    from index_build import run_sampled

    from deep_retrieval.retrieval import index as index_lib
    from deep_retrieval.retrieval import reranking
    from deep_retrieval.retrieval.descriptor_files import Descriptors
    from deep_retrieval.retrieval.faiss_ivf import set_nprobe

    shards_dir = os.path.join(args.folder, "shards")
    output = os.path.join(args.folder, "index")
    seconds, rss, anon, file_backed, said = run_sampled(
        [sys.executable, "-m", "serving.index", "--descriptors", shards_dir, "--output", output, "--kind", "ivfpq",
         "--noprogress"])
    database = Descriptors(shards_dir)
    names, vectors = [], []
    for n, v in database.batches():
        names += n
        vectors.append(v)
    vectors = np.concatenate(vectors)
    labels = np.asarray([label_of(n) for n in names])
    positives = np.bincount(labels[labels >= 0])
    query_file = Descriptors(os.path.join(args.folder, "queries.parquet"))
    query_names, queries = query_file.take(np.arange(len(query_file)))
    query_labels = [label_of(n) for n in query_names]
    _, exact = reranking.topk(queries, vectors, 100)
    index = index_lib.Index.load(output)
    position = {name: i for i, name in enumerate(names)}
    print(f"{len(names):,} descriptors of {vectors.shape[1]} dimensions ({len(positives)} photos, "
          f"{int((labels < 0).sum()):,} distractor views), {len(queries)} queries; index "
          f"{index.factory}, nprobe {index.nprobe}; build {seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB "
          f"(anonymous {anon / 2**30:.2f}, file-backed {file_backed / 2**30:.2f})")
    print("| search | q/s at k = 10 | recall@10 vs exact (k = 10) | mAP@100 (k = 100) |\n|---|---|---|---|")

    def rows(search):
        """Positions of the top 10 and top 100 of ``search(queries, k)``, and q/s at k = 10."""
        search(queries, 10)  # warm: code paths and the pages the lists read
        t0 = time.perf_counter()
        top10 = search(queries, 10)
        qps = len(queries) / (time.perf_counter() - t0)
        return top10, search(queries, 100), qps

    def report(title, top10, top100, qps):
        recall = np.mean([len(set(t.tolist()) & set(e[:10].tolist())) / 10 for t, e in zip(top10, exact)])
        ap = np.mean([average_precision_at(labels[t], q, positives[q]) for t, q in zip(top100, query_labels)])
        print(f"| {title} | {qps:.0f} | {recall:.3f} | {100 * ap:.2f} |", flush=True)

    report("exact (numpy)", *rows(lambda x, k: reranking.topk(x, vectors, k)[1]))

    def indexed(x, k):
        return np.asarray([[position[n] if n is not None else -1 for n in row] for row in index.search(x, k)[1]])

    defaults = index.nprobe, index.k_factor
    for nprobe in sorted({defaults[0], *args.nprobes}):
        set_nprobe(index._faiss, nprobe)
        for k_factor in sorted({1, defaults[1]}):
            index.k_factor = k_factor
            title = f"ivfpq, nprobe {nprobe}, k_factor {k_factor}"
            report(title + (" (defaults)" if (nprobe, k_factor) == defaults else ""), *rows(indexed))
    print(f"(the build said: {said})")


def main():
    from deep_retrieval.data.synthetic import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=102400, help="descriptors in the collection")
    parser.add_argument("--shard_rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=192, help="view width in pixels (height: 3/4 of it)")
    parser.add_argument("--distractor_share", type=float, default=0.15)
    parser.add_argument("--nprobes", type=lambda v: [int(n) for n in v.split(",")], default=[32, 64],
                        help="lists visited per query to search with besides the index's default")
    parser.add_argument("--folder", default=os.path.join(default_cache_dir(), "real_index"))
    args = parser.parse_args()
    extract(args)
    evaluate(args)


if __name__ == "__main__":
    main()
