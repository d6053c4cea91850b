"""tf.data pipelines: images by index, triplet batches, boxed images
(TensorFlow only; the codec itself is `deep_retrieval.data.images`)."""

import os

import tensorflow as tf

from deep_retrieval.data.images import _scaled_size, decode, file_problem, scale_views


@tf.autograph.experimental.do_not_convert
def path_tensor(paths):
    """File paths as a string tensor of their file-system bytes (so names
    that are not valid UTF-8 work too)."""
    return tf.constant([os.fsencode(p) for p in paths], tf.string)


def image_dataset(paths, longest, boxes=None, scales=(1.0,)):
    """``(index, views)`` pairs in order, decoded in parallel.

    ``views`` is `scale_views`' tuple (one image per scale). Images that fail
    to read or decode are dropped (the caller sees which indices are
    missing). ``boxes`` (``[n, 4]`` original pixels, NaN rows for none) crops
    queries as the retrieval protocols do.
    """
    n = len(paths)
    if boxes is None:
        boxes = [[float("nan")] * 4] * n
    # Only regular files of bounded size are read: a FIFO would block the
    # pipeline, /dev/zero would never end.
    usable = [i for i in range(n) if file_problem(paths[i]) is None]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(usable, tf.int64), path_tensor([paths[i] for i in usable]),
         tf.constant([boxes[i] for i in usable], tf.float32, shape=[len(usable), 4]))
    )

    def load(index, path, box):
        return index, scale_views(decode(tf.io.read_file(path)), longest, scales, box)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors().prefetch(tf.data.AUTOTUNE)


def augment(image, longest, seed):
    """A random crop of 80-100 % of the image, resized to the image's
    test-time size (longest side ``longest``, aspect ratio kept: training
    sees the geometry test sees), brightness/contrast jitter.

    ``seed`` is a ``[2]`` int tensor; the same seed gives the same result.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    shape = tf.shape(image)[:2]
    size = _scaled_size(shape, tf.reduce_max(shape), longest)  # the test-time size
    frac = tf.random.stateless_uniform([], seeds[0], 0.8, 1.0)
    crop = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * frac), tf.int32), 1)
    image = tf.image.stateless_random_crop(image, tf.concat([crop, [3]], 0), seed=seeds[1])
    image = tf.image.resize(image, size, method="bilinear", antialias=True)  # one resampling
    image = tf.image.stateless_random_brightness(image, 20.0, seed=seeds[2])
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=seeds[3])
    return tf.clip_by_value(image, 0.0, 255.0)


def triplet_dataset(
    paths, triplets, longest, batch_size, seed, augment_images=True, shard=None, repeat=False, size=None
):
    """Batches of ``{"query", "positive", "negative"}`` images, the input of
    `deep_retrieval.ranking.siamese.RankingModel`.

    Every image keeps its aspect ratio, its longest side ``longest`` (as at
    test time). Images of one aspect ratio (``size`` given) batch as blocks
    of that static shape; otherwise each batch is one triplet whose three
    images keep their own sizes (never padded or squashed).

    Args:
        paths: image path of each training index.
        triplets: ``[m, 3]`` indices (from `deep_retrieval.ranking.mining`), an
            array or an int64 tensor.
        longest: longest side of the training images.
        batch_size: triplets per batch (per input pipeline); 1 without
            ``size``.
        seed: int or int64 scalar tensor; with it, order and augmentation
            are deterministic.
        augment_images: random crop and photometric jitter.
        shard: optional ``(num_shards, index)`` for multi-worker input.
        repeat: cycle through the triplets forever (fresh augmentation each
            pass).
        size: ``(height, width)`` when every image has that size at
            ``longest``.
    """
    if size is None and batch_size != 1:
        raise ValueError(f"images of mixed sizes batch one triplet at a time, not {batch_size}")
    paths = path_tensor(paths)
    seed = tf.cast(seed, tf.int64)
    ds = _triplet_order(triplets, seed, shard, repeat)

    def load(i, triplet):
        images = {}
        for k, name in enumerate(("query", "positive", "negative")):
            image = decode(tf.io.read_file(tf.gather(paths, triplet[k])))
            if augment_images:
                image = augment(image, longest, tf.stack([seed, i * 3 + k]))
            else:
                (image,) = scale_views(image, longest)
            images[name] = image if size is None else tf.ensure_shape(image, tuple(size) + (3,))
        return images

    # No ignore_errors: a file that stopped decoding since mining read it
    # stops the run with its name (`Trainer.run`), backups kept.
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _triplet_order(triplets, seed, shard, repeat):
    """``(position, triplet)`` pairs: the triplets in one order per seed
    (stateless, the same on every pass), sharded, repeated."""
    triplets = tf.convert_to_tensor(triplets, tf.int64)
    order = tf.argsort(tf.random.stateless_uniform(tf.shape(triplets)[:1], tf.stack([seed, seed + 1])))
    ds = tf.data.Dataset.from_tensor_slices(tf.gather(triplets, order))
    if shard is not None:
        ds = ds.shard(*shard)
    if repeat:
        ds = ds.repeat()
    return ds.enumerate()


def map_triplet_dataset(maps, triplets, batch_size, seed, shard=None, repeat=False):
    """`triplet_dataset` over precomputed feature maps (`frozen_trunk`):
    batches ``[B, 3, h, w, C]`` of the query, positive and negative maps
    (``maps``: ``[n, h, w, C]`` numpy, one per training index), the
    triplets in `triplet_dataset`'s order for the same seed."""
    shape = (3,) + maps.shape[1:]
    ds = _triplet_order(triplets, tf.cast(seed, tf.int64), shard, repeat)

    def load(i, triplet):
        return tf.ensure_shape(tf.numpy_function(lambda t: maps[t], [triplet], tf.float32, stateful=False), shape)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def box_dataset(paths, boxes, longest, batch_size, seed, shard=None, size=None):
    """Endless batches of ``(images [B, h, w, 3], boxes [B, 4], sizes [B, 2])``
    for RPN training.

    Each image keeps its aspect ratio, its longest side ``longest``, and is
    flipped left-right at random; its box ``(x0, y0, x1, y1)``, given as a
    share of the image's width and height, follows the flip. A batch is
    zero-padded to its largest image; ``sizes`` holds each image's true
    ``(height, width)``.

    Args:
        paths: image paths.
        boxes: ``[n, 4]`` boxes relative to the image size (0..1).
        longest: longest side of the training images.
        batch_size: images per batch (per input pipeline).
        seed: int; order and flips are deterministic given it.
        shard: optional ``(num_shards, index)`` for multi-worker input.
        size: as for `triplet_dataset`.
    """
    ds = tf.data.Dataset.from_tensor_slices(
        (path_tensor(paths), tf.constant(boxes, tf.float32))
    )
    if shard is not None:
        ds = ds.shard(*shard)
    ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat().enumerate()

    def load(i, item):
        path, box = item
        (image,) = scale_views(decode(tf.io.read_file(path)), longest)
        flip = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64), i])) < 0.5
        image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
        box = tf.cond(flip, lambda: tf.stack([1 - box[2], box[1], 1 - box[0], box[3]]), lambda: box)
        if size is not None:
            image = tf.ensure_shape(image, tuple(size) + (3,))
        return image, box, tf.shape(image)[:2]

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    shapes = ([None, None, 3] if size is None else list(size) + [3], [4], [2])
    return ds.ignore_errors().padded_batch(batch_size, shapes, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
