"""tf.distribute helpers of training: the strategy, the chief, and sums of
per-example results (the RPN's images at their own sizes).

TensorFlow only.
"""

import tensorflow as tf


def make_strategy(name):
    """``default`` (one device), ``mirrored`` (local GPUs/CPU) or
    ``multi_worker`` (hosts described by TF_CONFIG)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}; use default, mirrored or multi_worker.")


def is_chief(strategy):
    """Whether this worker writes the run's files (the chief, or worker 0
    without one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def worker_index(strategy):
    """This worker's index in the cluster (0 alone)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    return resolver.task_id


def sum_loop(count, body, init):
    """``init`` plus ``body(i)`` summed over ``i < count``, one ``i`` after the
    other (a `tf.while_loop`: one image's activations alive at a time)."""
    _, total = tf.while_loop(
        lambda i, _: i < count, lambda i, t: (i + 1, [x + y for x, y in zip(t, body(i))]), (tf.constant(0), init),
        parallel_iterations=1,
    )
    return total
