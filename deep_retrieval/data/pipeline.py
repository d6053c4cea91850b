"""tf.data pipelines: decoding, resizing, triplet batches (TensorFlow only)."""

import tensorflow as tf


def decode(data):
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 RGB ``[H, W, 3]`` in [0, 255].

    Grayscale is expanded to RGB, alpha dropped, the first GIF frame used;
    EXIF orientation is not applied (the same in training and serving).
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.cast(image, tf.float32)


def resize_longest(image, longest):
    """Resizes ``[H, W, 3]`` so that its longest side is ``longest`` (bilinear,
    antialiased when shrinking)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(longest, tf.float32) / tf.reduce_max(shape)
    size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
    return tf.image.resize(image, size, method="bilinear", antialias=True)


def crop_box(image, box):
    """Crops ``[H, W, 3]`` to ``box = (x0, y0, x1, y1)`` (pixels, clipped)."""
    shape = tf.shape(image)
    box = tf.cast(box, tf.float32)
    x0 = tf.clip_by_value(tf.cast(tf.floor(box[0]), tf.int32), 0, shape[1] - 1)
    y0 = tf.clip_by_value(tf.cast(tf.floor(box[1]), tf.int32), 0, shape[0] - 1)
    x1 = tf.clip_by_value(tf.cast(tf.math.ceil(box[2]), tf.int32), x0 + 1, shape[1])
    y1 = tf.clip_by_value(tf.cast(tf.math.ceil(box[3]), tf.int32), y0 + 1, shape[0])
    return image[y0:y1, x0:x1]


def image_dataset(paths, longest, boxes=None):
    """``(index, image)`` pairs in order, decoded in parallel.

    Images that fail to read or decode are dropped (the caller sees which
    indices are missing). ``boxes`` (``[n, 4]``, NaN rows for none) crops
    before resizing, as the retrieval protocols do for queries.
    """
    n = len(paths)
    if boxes is None:
        boxes = [[float("nan")] * 4] * n
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.range(n, dtype=tf.int64), tf.constant(list(paths), tf.string), tf.constant(boxes, tf.float32))
    )

    def load(index, path, box):
        image = decode(tf.io.read_file(path))
        image = tf.cond(
            tf.reduce_any(tf.math.is_nan(box)), lambda: image, lambda: crop_box(image, box)
        )
        return index, resize_longest(image, longest)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors().prefetch(tf.data.AUTOTUNE)


def training_size(longest):
    """``(height, width)`` of training crops: 3:4 landscape, longest side given."""
    return (int(round(longest * 3 / 4)), int(longest))


def augment(image, size, seed):
    """Random crop (80-100 % of each side), resize, brightness/contrast jitter.

    ``seed`` is a ``[2]`` int tensor; the same seed gives the same result.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    frac = tf.random.stateless_uniform([2], seeds[0], 0.8, 1.0)
    crop = tf.maximum(tf.cast(shape * frac, tf.int32), 1)
    image = tf.image.stateless_random_crop(image, tf.concat([crop, [3]], 0), seed=seeds[1])
    image = tf.image.resize(image, size, antialias=True)
    image = tf.image.stateless_random_brightness(image, 20.0, seed=seeds[2])
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=seeds[3])
    return tf.clip_by_value(image, 0.0, 255.0)


def triplet_dataset(
    paths, triplets, longest, batch_size, seed, augment_images=True, shard=None, repeat=False
):
    """Batches of ``(query, positive, negative)`` images ``[B, h, w, 3]`` each.

    Args:
        paths: image path of each training index.
        triplets: ``[m, 3]`` indices (from `deep_retrieval.mining`).
        longest: longest side of the training crops.
        batch_size: triplets per batch (per input pipeline).
        seed: int; with it, order and augmentation are deterministic.
        augment_images: random crop and photometric jitter.
        shard: optional ``(num_shards, index)`` for multi-worker input.
        repeat: cycle through the triplets forever (fresh augmentation each
            pass).
    """
    size = training_size(longest)
    paths = tf.constant(list(paths), tf.string)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(triplets, tf.int64))
    if shard is not None:
        ds = ds.shard(*shard)
    ds = ds.shuffle(len(triplets), seed=seed, reshuffle_each_iteration=False)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()

    def load(i, triplet):
        images = []
        for k in range(3):
            image = decode(tf.io.read_file(tf.gather(paths, triplet[k])))
            if augment_images:
                image = augment(image, size, tf.stack([tf.constant(seed, tf.int64), i * 3 + k]))
            else:
                image = tf.image.resize(image, size, antialias=True)
            images.append(tf.ensure_shape(image, size + (3,)))
        return tuple(images)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
