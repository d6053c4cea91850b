"""Descriptor extraction for lists of image files (TensorFlow input pipeline)."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from deep_retrieval.data import pipeline
from deep_retrieval.data.images import diagnose, file_problem, scaled_shape


def compiled_fn(fn):
    """``fn`` compiled with `tf.function`, generalising over image sizes.

    Under another Keras backend (JAX) it runs eagerly on numpy copies of
    the inputs, so it always sees the model's current weights.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        return tf.function(fn, reduce_retracing=True)
    return lambda *args: fn(*tf.nest.map_structure(np.asarray, args))


def compiled(model):
    """A compiled inference call of a descriptor model on per-scale views
    (see `extract`), one graph for all sizes."""
    return compiled_fn(lambda views: model(list(views), training=False))


def compiled_single_scale(model):
    """`compiled` for the model's descriptor at scale 1 only (training's
    mining)."""
    return compiled_fn(lambda views: model.single_scale(views[0], training=False))


def extract(fn, paths, longest, boxes=None, scales=(1.0,), batch_size=16, progress=True,
            desc="extract", strict=True, sizes=None):
    """Descriptors of image files, in order.

    Each image is decoded once and resized from the original to every scale
    (`images.scale_views`). Images are read in the order of their size at
    ``longest`` (from their headers, `size_order`), so that images of one
    size run as batches even when the list mixes sizes; the result keeps
    the order of ``paths``.

    Args:
        fn: a callable from a list of float32 batches ``[N, H_s, W_s, 3]``,
            one per scale, to ``[N, D]`` (see `compiled`).
        paths: image files.
        longest: at scale 1, the longest side of the full image.
        boxes: optional ``[n, 4]`` crop boxes in original pixels (NaN rows:
            no crop); a crop keeps its image's scale.
        scales: relative scales (the model's ``config.scales`` for
            `compiled`, ``(1.0,)`` for `compiled_single_scale`).
        batch_size: images per call at most.
        progress: show a progress bar.
        desc: the progress bar's label.
        strict: raise on unreadable images; otherwise return them as failed.
        sizes: optional ``[(height, width)]`` of the images (a manifest's),
            for the reading order without opening the files first.

    Returns:
        ``(descriptors [n, D] float32, failed indices)``; rows of failed images
        are zero.
    """
    n = len(paths)
    out, done = None, np.zeros(n, dtype=bool)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for indices, views in batches(paths, longest, boxes, scales, batch_size, sizes):
            d = np.asarray(fn(views))
            if out is None:
                out = np.zeros((n, d.shape[1]), dtype=np.float32)
            out[indices] = d
            done[indices] = True
            bar.update(len(indices))
    failed = np.nonzero(~done)[0]
    if strict and len(failed):
        listed = "; ".join(f"{paths[i]}: {diagnose(paths[i])}" for i in failed[:5])
        raise ValueError(
            f"{len(failed)} image(s) could not be read or decoded: {listed}"
            + (" ..." if len(failed) > 5 else "")
        )
    if out is None:
        out = np.zeros((n, 0), dtype=np.float32)
    return out, failed


def batches(paths, longest, boxes=None, scales=(1.0,), batch_size=16, sizes=None):
    """``(indices, views)`` batches of the readable images of ``paths``:
    ``views`` holds one ``[N, H_s, W_s, 3]`` float32 batch per scale of
    images of one size, read in `size_order` (``longest``, ``boxes`` and
    ``sizes`` as for `extract`); unreadable images are left out."""
    order = size_order(paths, longest, boxes, sizes)
    ordered_boxes = None if boxes is None else [boxes[i] for i in order]
    batch, indices = [], []
    for index, views in pipeline.image_dataset([paths[i] for i in order], longest, ordered_boxes, scales):
        if batch and ([v.shape for v in views] != [v.shape for v in batch[0]] or len(batch) == batch_size):
            yield indices, [tf.stack(v) for v in zip(*batch)]
            batch, indices = [], []
        batch.append(views)
        indices.append(order[int(index)])
    if batch:
        yield indices, [tf.stack(v) for v in zip(*batch)]


def size_order(paths, longest, boxes=None, sizes=None):
    """Indices of ``paths`` ordered by the size of the whole image at
    ``longest`` (stable), from ``sizes`` (``[(height, width)]``, when the
    caller knows them) or else the file headers; boxed images and files
    whose header does not read keep their place at the end. Only an order:
    decoding, and its checks, happen later as always."""
    keys = []
    for i, path in enumerate(paths):
        key = None
        whole = boxes is None or np.isnan(np.asarray(boxes[i], np.float64)).any()
        if whole and sizes is not None:
            key = scaled_shape(sizes[i][0], sizes[i][1], longest)
        elif whole and file_problem(path) is None:  # never open a FIFO or a device
            try:
                with Image.open(path) as im:
                    key = scaled_shape(im.height, im.width, longest)
            except Exception:  # unreadable: the decoder reports it
                key = None
        keys.append((key is None, key or (0, 0), i))
    return [k[2] for k in sorted(keys)]


def model_describer(model, longest, batch_size=16, progress=True):
    """``describe(paths, boxes=None, desc=...) -> [n, D]`` for a Keras
    descriptor model at its own scales (see `evaluate_model`)."""
    fn = compiled(model)

    def describe(paths, boxes=None, desc="extract"):
        return extract(fn, paths, longest, boxes, model.config.scales, batch_size, progress, desc)[0]

    return describe


def saved_model_describer(path, batch_size=16, progress=True):
    """``describe(paths, boxes=None, desc=...)`` through an exported
    SavedModel's own serving signatures (``serving_default`` on the encoded
    files, ``crops`` for boxed queries): what TF Serving would answer."""
    module = tf.saved_model.load(path)
    default, crops = module.signatures["serving_default"], module.signatures["crops"]

    def describe(paths, boxes=None, desc="extract"):
        out = []
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                blobs = []
                for p in chunk:
                    try:
                        with open(p, "rb") as f:
                            blobs.append(f.read())
                    except OSError as e:
                        raise ValueError(f"{p}: cannot read the file ({e})") from e
                try:
                    if boxes is None:
                        d = default(images=tf.constant(blobs))
                    else:
                        d = crops(images=tf.constant(blobs),
                                  boxes=tf.constant(boxes[start:start + batch_size], tf.float32))
                except tf.errors.InvalidArgumentError:
                    for p in chunk:  # name the file that failed
                        reason = diagnose(p)
                        if reason:
                            raise ValueError(f"{p}: {reason}") from None
                    raise
                out.append(d["descriptors"].numpy())
                bar.update(len(chunk))
        return np.concatenate(out)

    return describe


def query_boxes(dataset):
    """The query boxes of a `RetrievalDataset` as ``[n, 4]`` rows, NaN for a
    query without one (what `extract` takes)."""
    return [[float("nan")] * 4 if b is None else list(b) for b in dataset.query_boxes]


def evaluate_model(describe, dataset, qe=0, qe_alpha=3.0, dba=0, rerank=False):
    """Describes a `RetrievalDataset` (queries cropped to their boxes), ranks
    it, optionally with DBA, αQE and SuperGlobal re-ranking (in that order),
    and returns `evaluation.evaluate`'s dict.

    ``describe(paths, boxes=None, desc=...)`` gives descriptors of files
    (`model_describer`, `saved_model_describer`). A query without a box is
    described whole; with one, every query needs one.
    """
    from deep_retrieval.retrieval import evaluation, reranking

    db = describe(dataset.images, desc=f"{dataset.name} database")
    boxes = query_boxes(dataset) if any(b is not None for b in dataset.query_boxes) else None
    q = describe(dataset.queries, boxes, desc=f"{dataset.name} queries")
    if dba:
        db = reranking.database_augmentation(db, dba)
    if qe:
        q = reranking.alpha_query_expansion(q, db, qe, qe_alpha)
    ranks = evaluation.rerank_ranks(q, db) if rerank else evaluation.rank_by_similarity(q, db)
    return evaluation.evaluate(ranks, dataset.gnd, query_indices=dataset.query_indices)


def proposal_recall(model, paths, boxes, longest, tops=(16, 64, 256), iou_threshold=0.5,
                    progress=True):
    """Recall of landmark boxes by the regions a descriptor model pools.

    Each image is resized to ``longest``; its regions (`DescriptorModel.
    pooled_regions`: the feature-cell blocks actually max-pooled) are mapped
    back to the image's pixels and matched against its box.

    Args:
        model: a `DescriptorModel` (``regions="rpn"`` or ``"grid"``).
        paths: image files.
        boxes: ``[n, 4]`` one landmark box per image, original pixels.
        longest: resize so the longest side is this.
        tops: recall of the best ``k`` regions for each ``k`` (the RPN's
            proposals are ordered by objectness).
        iou_threshold: a region matches with IoU >= this.

    Returns:
        ``{"rpn@k" or "grid@k": recall}``, plus ``"grid_regions"`` (the grid's
        region count) and ``"images"``; recall in [0, 1].
    """
    from deep_retrieval.retrieval import evaluation

    boxes = np.asarray(boxes, np.float64)
    kind = model.config.regions
    found = {k: [] for k in tops}
    grid, targets, grid_count = [], [], 0
    for index, (image,) in tqdm(pipeline.image_dataset(paths, longest), total=len(paths),
                                desc="proposal recall", unit="img", disable=not progress):
        index = int(index)
        image = image.numpy()[None]
        fmap = model.backbone(model.preprocess(image))  # once, for both region sets
        pooled = model.regions_of_map(fmap, image.shape[1:3])[0]
        rigid = model.regions_of_map(fmap, image.shape[1:3], grid=True)[0]
        with Image.open(paths[index]) as im:
            width, height = im.size
        to_original = np.array([width / image.shape[2], height / image.shape[1]] * 2)
        for k in tops:
            found[k].append(pooled[:k] * to_original)
        grid.append(rigid * to_original)
        grid_count = max(grid_count, len(rigid))
        targets.append(boxes[index])
    result = {f"{kind}@{k}": evaluation.box_recall(found[k], targets, iou_threshold) for k in tops}
    result["grid@all"] = evaluation.box_recall(grid, targets, iou_threshold)
    result["grid_regions"] = grid_count
    result["images"] = len(targets)
    return result


def describer(model_path, image_size=None, progress=True, dtype=None):
    """`evaluate_model`'s ``describe`` for a model file of either kind
    (``image_size``: the longest side for a ``.keras`` model, default the
    one it carries; a SavedModel has its own inside its graph; ``dtype``:
    run a ``.keras`` model in ``"float32"`` or ``"bfloat16"``, default its
    own)."""
    from deep_retrieval.model.descriptor_model import for_inference, load_descriptor_model

    if os.path.isdir(model_path):
        if image_size or dtype:
            raise ValueError(f"{model_path} is a SavedModel: it resizes images inside its graph and has its "
                             "dtype fixed at export; --image_size and --dtype do not apply")
        return saved_model_describer(model_path, progress=progress)
    if not os.path.isfile(model_path):
        raise ValueError(f"{model_path}: no such model file or SavedModel folder")
    model, image_size = load_descriptor_model(model_path, image_size)
    return model_describer(for_inference(model, dtype), image_size, progress=progress)
