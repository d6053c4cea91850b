"""Descriptor extraction for lists of image files (TensorFlow input pipeline)."""

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from deep_retrieval.data import pipeline


def compiled_fn(fn):
    """``fn`` compiled with `tf.function`, generalising over image sizes."""
    return tf.function(fn, reduce_retracing=True)


def compiled(model):
    """A compiled inference call of a Keras model, one graph for all sizes."""
    return compiled_fn(lambda x: model(x, training=False))


def extract(fn, paths, longest, boxes=None, batch_size=16, progress=True, desc="extract", strict=True):
    """Descriptors of image files, in order.

    Consecutive images of the same size are batched together.

    Args:
        fn: a callable from ``[N, H, W, 3]`` float32 to ``[N, D]``
            (see `compiled`).
        paths: image files.
        longest: images are resized so their longest side is this.
        boxes: optional ``[n, 4]`` crop boxes (NaN rows: no crop).
        batch_size: images per call at most.
        progress: show a progress bar.
        desc: the progress bar's label.
        strict: raise on unreadable images; otherwise return them as failed.

    Returns:
        ``(descriptors [n, D] float32, failed indices)``; rows of failed images
        are zero.
    """
    n = len(paths)
    out, done = None, np.zeros(n, dtype=bool)
    batch, indices = [], []

    def flush():
        nonlocal out
        d = np.asarray(fn(tf.stack(batch)))
        if out is None:
            out = np.zeros((n, d.shape[1]), dtype=np.float32)
        out[indices] = d
        done[indices] = True
        bar.update(len(batch))
        batch.clear()
        indices.clear()

    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for index, image in pipeline.image_dataset(paths, longest, boxes):
            if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
                flush()
            batch.append(image)
            indices.append(int(index))
        if batch:
            flush()
    failed = np.nonzero(~done)[0]
    if strict and len(failed):
        listed = ", ".join(str(paths[i]) for i in failed[:5])
        raise ValueError(
            f"{len(failed)} image(s) could not be read or decoded: {listed}"
            + (" ..." if len(failed) > 5 else "")
        )
    if out is None:
        out = np.zeros((n, 0), dtype=np.float32)
    return out, failed


def evaluate_model(fn, dataset, longest, progress=True, qe=0, qe_alpha=3.0, dba=0):
    """Extracts a `RetrievalDataset` (queries cropped to their boxes), ranks
    it, optionally with DBA and αQE, and returns `evaluation.evaluate`'s dict."""
    from deep_retrieval import evaluation, search

    db, _ = extract(fn, dataset.images, longest, progress=progress, desc=f"{dataset.name} database")
    boxes = [[float("nan")] * 4 if b is None else list(b) for b in dataset.query_boxes]
    q, _ = extract(fn, dataset.queries, longest, boxes, progress=progress, desc=f"{dataset.name} queries")
    if dba:
        db = search.database_augmentation(db, dba)
    if qe:
        q = search.alpha_query_expansion(q, db, qe, qe_alpha)
    ranks = evaluation.rank_by_similarity(q, db)
    return evaluation.evaluate(ranks, dataset.gnd)
