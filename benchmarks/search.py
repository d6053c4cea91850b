"""Search speed: exact search against the memory-bandwidth bound, and IVF-PQ.

1,000 queries over N x D random unit vectors (default 1M x 2048 float32,
8 GiB, held once). Prints, from one run:

* the memory bandwidth of this machine, measured by streaming the database
  (a sum over it, which reads every byte once), and the time one exact
  search pass would take at that bandwidth;
* the matrix-product speed (a 2048^3 float32 product), and the time the
  query x database scores need at that speed (with 1,000 queries batched the
  search is compute-bound on a small CPU, so both bounds are printed);
* exact search (chunked matrix products): queries/s, peak RSS, ratio to the
  larger bound;
* FAISS IVF-PQ: training and adding time, queries/s, recall@100 against
  exact, and how often the database vector each query was made from (a
  copy plus noise of norm 0.5) is in its top 100. On uniformly random vectors the exact
  top-100 beyond that one are near-ties with no structure, so recall@100
  against exact is low by construction; the second figure is the meaningful
  one there.

    python benchmarks/search.py [--n 1000000] [--dim 2048] [--queries 1000]
"""

import argparse
import resource
import time

import numpy as np

from deep_retrieval.retrieval import index as index_lib
from deep_retrieval.retrieval import reranking


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=32768)
    parser.add_argument("--skip_ivfpq", action="store_true")
    parser.add_argument("--factory", default="IVF1024,PQ64", help="Faiss index_factory string")
    parser.add_argument("--train_size", type=int, default=50_000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    db = np.empty((args.n, args.dim), dtype=np.float32)
    for start in range(0, args.n, 65536):
        block = rng.standard_normal((min(65536, args.n - start), args.dim), dtype=np.float32)
        db[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    sources = rng.choice(args.n, args.queries, replace=False)
    queries = db[sources] + (0.5 / np.sqrt(args.dim)) * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"database {args.n} x {args.dim} float32 ({db.nbytes / 2**30:.1f} GiB), {args.queries} queries; "
          f"RSS so far {_rss_gb():.1f} GiB", flush=True)

    db.sum(axis=0)  # warm
    t0 = time.perf_counter()
    for _ in range(3):
        db.sum(axis=0)
    stream = (time.perf_counter() - t0) / 3
    bandwidth = db.nbytes / stream
    print(f"memory bandwidth (streaming the database): {bandwidth / 1e9:.1f} GB/s, "
          f"one pass {stream:.2f} s", flush=True)

    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    flops = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    compute = 2 * args.n * args.dim * args.queries / flops
    print(f"matrix-product speed: {flops / 1e9:.0f} GFLOP/s; the {args.queries} x {args.n} scores need "
          f"{compute:.2f} s at that speed", flush=True)

    t0 = time.perf_counter()
    exact_s, exact_i = reranking.topk(queries, db, args.k, chunk=args.chunk)
    exact_time = time.perf_counter() - t0
    bound = max(stream, compute)
    print(f"exact: {args.queries / exact_time:.1f} queries/s ({exact_time:.2f} s for all, one pass over the "
          f"database); memory bound {stream:.2f} s, compute bound {compute:.2f} s -> {exact_time / bound:.2f}x "
          f"the larger bound; peak RSS {_rss_gb():.1f} GiB", flush=True)

    if args.skip_ivfpq:
        return
    index = index_lib.Index(args.dim, kind="ivfpq", factory=args.factory)
    t0 = time.perf_counter()
    index.train(db[rng.choice(args.n, min(args.n, args.train_size), replace=False)])
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, args.n, 131072):
        end = min(args.n, start + 131072)
        index.add(db[start:end], range(start, end))
    add_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = index.search(queries, args.k)
    pq_time = time.perf_counter() - t0
    recall = np.mean([len(set(map(int, g)) & set(e.tolist())) / args.k for g, e in zip(ids, exact_i)])
    found = np.mean([str(s) in g for s, g in zip(sources, ids)])
    print(f"IVF-PQ ({index.factory}, nprobe {index.nprobe}): train {train_time:.0f} s, "
          f"add {add_time:.0f} s, {args.queries / pq_time:.1f} queries/s, recall@{args.k} against exact "
          f"{recall:.3f}, the query's source vector in the top {args.k}: {found:.3f}; peak RSS {_rss_gb():.1f} GiB")


if __name__ == "__main__":
    main()
