"""The streaming index build from shards: time, peak memory, speed, recall.

Writes synthetic clustered descriptors (unit vectors: one of ``--clusters``
random centres plus ``--spread`` times as much noise) as Parquet shards of ``--shard_rows`` rows, then
for each size in ``--sizes`` (a folder holding the first shards) runs

    python -m serving.index --descriptors SHARDS --output INDEX --kind ivfpq --factory F

as its own process, sampling its memory from ``/proc`` every 0.1 s. Prints
per size: build time, peak RSS (total, anonymous, and file-backed: pages of
the memory-mapped lists and shards, which the kernel can drop), index size
on disk, and for each of ``--search_nprobes`` (lists visited) and
``--k_factors`` (candidates per result re-ranked
exactly from the index's float16 descriptors, 1 for the codes' own order)
queries/s (one batch of ``--queries``, the vectors' pages already cached)
and recall@10 against exact search over all the shards (each query a
database vector plus noise). ``--serving`` then measures the peak RSS of
``serving.search`` and ``serving.web`` on the largest index. With
sizes that double, the peak RSS column shows whether memory grows with the
collection.

    python benchmarks/index_build.py [--sizes 1250000,2500000,5000000] [--dim 512] \
        [--factory OPQ64_256,IVF8192_HNSW32,PQ64] [--folder /tmp/index_build]
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from deep_retrieval.retrieval import index as index_lib
from deep_retrieval.retrieval import reranking
from deep_retrieval.retrieval.descriptor_files import Descriptors, shard_name
from deep_retrieval.retrieval.faiss_ivf import set_nprobe


def write_shard(path, names, vectors):
    """A Parquet shard as `serving.extract` writes one (``image``,
    ``descriptor`` columns), written beside ``path`` and renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = vectors.shape
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)),
                                      pa.array(vectors.reshape(-1)))
    pq.write_table(pa.table({"image": pa.array(names), "descriptor": column}), path + ".tmp")
    os.replace(path + ".tmp", path)


def write_shards(folder, count, rows, dim, clusters, spread, seed=0):
    """``count`` shards of ``rows`` clustered unit vectors; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    centres = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    paths = []
    for i in range(count):
        path = os.path.join(folder, shard_name(i, count))
        paths.append(path)
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(seed + 1 + i)
        x = centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_shard(path, [f"s{i:05d}/{j:07d}.jpg" for j in range(rows)], x)
    return paths


def run_sampled(command):
    """Runs ``command``; returns (seconds, peak RSS, peak RssAnon, peak RssFile
    in bytes, its last output line), sampled from ``/proc`` every 0.1 s (the
    peak RSS is the kernel's high-water mark, VmHWM, as last sampled:
    ``wait4``'s ``ru_maxrss`` would count this process's memory at the fork)."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{process.pid}/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{output}")
    last = (output.strip().splitlines() or [""])[-1]
    return seconds, peaks["VmHWM"], peaks["RssAnon"], peaks["RssFile"], last


def _status(pid, keys=("VmHWM", "VmRSS", "RssAnon", "RssFile")):
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split(":")[0] in keys}


def serving_memory(index_folder, dim, work):
    """Peak RSS of ``serving.search`` answering one query on ``index_folder``
    and of ``serving.web`` once it has answered one search, both with a
    random-weight ``dim``-D export (the model, not the index, is most of
    it); and
    of loading the index alone, then with its names turned into a Python
    list (what serving held before the id store)."""
    import urllib.request

    from PIL import Image

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _served import export_random_model, free_port

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    backbone = "tiny" if dim <= 128 else "efficientnet_lite0"  # the tiny CNN has 128 channels
    base = export_random_model(work, backbone, whitening_dim=dim)
    query = os.path.join(work, "query.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(query)
    rows = {}
    load = "import sys; from deep_retrieval.retrieval.index import Index; index = Index.load(sys.argv[1])"
    for title, code in (("Index.load", load), ("Index.load, then list(index.ids)", load + "; names = list(index.ids)")):
        rows[title] = run_sampled([sys.executable, "-c", code, index_folder])[1]
    model = os.path.join(base, "1")
    rows["serving.search, one query"] = run_sampled(
        [sys.executable, "-m", "serving.search", "--index", index_folder, "--saved_model", model, "--query", query,
         "--top", "10"])[1]
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "serving.web", "--index", index_folder, "--saved_model", model,
                            "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in web.stdout:
            if "search page for" in line:
                break
        else:
            sys.exit(f"serving.web stopped: {web.poll()}")
        boundary = "----bench"
        with open(query, "rb") as f:
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                    "Content-Type: image/jpeg\r\n\r\n").encode() + f.read() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search", body,
                                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.read()
        rows["serving.web, after one search"] = _status(web.pid)["VmHWM"]
    finally:
        web.terminate()
        web.wait()
    return rows


def exact_top10(queries, paths):
    """Exact top-10 positions over the shards, one shard in memory at a time."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for path in paths:
        for _, x in Descriptors(path).batches(rows=262144):
            s, i = reranking.topk(queries, x, 10)
            best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset], 1)
            keep = np.argsort(-best_s, axis=1, kind="stable")[:, :10]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
            offset += len(x)
    return best_i


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1250000,2500000,5000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard_rows", type=int, default=250000)
    parser.add_argument("--clusters", type=int, default=20000)
    parser.add_argument("--spread", type=float, default=0.5, help="noise around a centre, relative to its norm")
    parser.add_argument("--factory", default="OPQ64_256,IVF8192_HNSW32,PQ64")
    parser.add_argument("--nprobe", type=int, default=16, help="lists visited per query (serving.index's default)")
    parser.add_argument("--search_nprobes", default=None,
                        help="comma-separated nprobe values to search with as well (default: --nprobe only)")
    parser.add_argument("--k_factors", default="1,16,32,64",
                        help="candidates per result re-ranked exactly from the float16 descriptors (1: none)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5, help="query noise norm (the vectors have norm 1)")
    parser.add_argument("--folder", default="/tmp/index_build")
    parser.add_argument("--serving", action="store_true",
                        help="then measure the peak RSS of serving.search and serving.web on the largest index")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    shards = -(-max(sizes) // args.shard_rows)
    t0 = time.perf_counter()
    paths = write_shards(os.path.join(args.folder, "shards"), shards, args.shard_rows, args.dim, args.clusters,
                         args.spread)
    on_disk = sum(os.path.getsize(p) for p in paths)
    print(f"{shards} shards of {args.shard_rows} x {args.dim} float32 ({on_disk / 1e9:.1f} GB of Parquet) "
          f"ready in {time.perf_counter() - t0:.0f} s; factory {args.factory}, nprobe {args.nprobe}", flush=True)
    rng = np.random.default_rng(1)
    nprobes = [int(n) for n in (args.search_nprobes or str(args.nprobe)).split(",")]
    settings = [(n, int(k)) for n in nprobes for k in args.k_factors.split(",")]
    print("| descriptors | shards | build | peak RSS | anonymous | file-backed | index on disk | "
          + " | ".join(f"nprobe {n}, k_factor {k}: q/s, recall@10" for n, k in settings) + " |\n|"
          + "---|" * (7 + len(settings)), flush=True)
    for size in sizes:
        count = -(-size // args.shard_rows)
        subset = os.path.join(args.folder, f"first-{count}")
        shutil.rmtree(subset, ignore_errors=True)
        os.makedirs(subset)
        for path in paths[:count]:
            os.symlink(path, os.path.join(subset, os.path.basename(path)))
        output = os.path.join(args.folder, f"index-{count}")
        seconds, rss, anon, file_backed, said = run_sampled(
            [sys.executable, "-m", "serving.index", "--descriptors", subset, "--output", output, "--kind", "ivfpq",
             "--factory", args.factory, "--nprobe", str(args.nprobe), "--noprogress"])
        size_on_disk = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
        # Queries: database vectors plus noise of norm --noise.
        sources = np.sort(rng.choice(count * args.shard_rows, args.queries, replace=False))
        queries = Descriptors(subset).take(sources)[1]
        queries += (args.noise / np.sqrt(args.dim)) * rng.standard_normal(queries.shape, dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        want = exact_top10(queries, paths[:count])
        index = index_lib.Index.load(output)
        cells = []
        for nprobe, k_factor in settings:
            set_nprobe(index._faiss, nprobe)
            index.k_factor = k_factor
            index.search(queries, 10)  # warm: the code paths and the pages the short lists read
            t0 = time.perf_counter()
            _, got = index.search(queries, 10)
            qps = len(queries) / (time.perf_counter() - t0)
            recall = np.mean([len(set(index.ids.positions([n for n in g if n is not None]).tolist())
                                  & set(w.tolist())) / 10 for g, w in zip(got, want)])
            cells.append(f"{qps:.0f}, {recall:.3f}")
        print(f"| {count * args.shard_rows:,} | {count} | {seconds:.0f} s | {rss / 2**30:.2f} GiB "
              f"| {anon / 2**30:.2f} GiB | {file_backed / 2**30:.2f} GiB | {size_on_disk / 2**30:.2f} GiB "
              f"| {' | '.join(cells)} |", flush=True)
        del index
    print(f"(last build said: {said})")
    if args.serving:
        print("| process, on the last index | peak RSS |\n|---|---|")
        for title, peak in serving_memory(output, args.dim, os.path.join(args.folder, "serving")).items():
            print(f"| {title} | {peak / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
