"""The ranking step of DIR training: gradients of the triplet ranking loss
over a batch of (query, positive, negative) images, as one block, in
micro-batches, or one triplet at a time at its own size.

TensorFlow only (``tf.GradientTape``).
"""

import tensorflow as tf

from deep_retrieval import losses
from deep_retrieval.distribution import sum_loop


def ranking_gradients(model, variables, query, positive, negative, margin, global_batch, micro_batches=1,
                      sizes=None, unroll=False):
    """The triplet loss of a batch and its gradients.

    The batch is split into ``micro_batches`` equal parts run one after the
    other, so only one part's activations are alive at a time; their loss
    sums and gradients add up to the whole batch's, since the loss is a sum
    over triplets divided by ``global_batch`` (batch-norm statistics, frozen
    for pretrained backbones, are the one exception).

    Collections of one aspect ratio give batches of one static size, run as
    one block. Collections of mixed aspect ratios give zero-padded batches
    (`pipeline.triplet_dataset`) with their images' true ``sizes``: each
    triplet then runs on its own, each image at its own size (slower, never
    squashed).

    Args:
        model: a `DescriptorModel`; variables: what to differentiate.
        query, positive, negative: ``[B, H, W, 3]`` images.
        margin: the ranking margin.
        global_batch: triplets per optimizer step over all replicas.
        micro_batches: parts of ``B`` (must divide it).
        sizes: optional ``[B, 3, 2]`` true ``(height, width)`` of the
            query, positive and negative images of a padded batch.
        unroll: Python loops instead of `tf.while_loop` (synchronized
            batch norm across replicas).

    Returns:
        ``(loss, grads)``.
    """

    def gradients(images, together):
        # ``together``: the three streams share one size and run as one batch.
        with tf.GradientTape() as tape:
            if together:
                d = tf.split(model.single_scale(tf.concat(images, 0), training=True), 3)
            else:
                d = [model.single_scale(image, training=True) for image in images]
            loss = losses.triplet_ranking_loss_sum(*d, margin) / global_batch
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        return [loss] + grads

    images = (query, positive, negative)
    init = [tf.constant(0.0)] + [tf.zeros_like(v) for v in variables]
    if sizes is not None:
        def one(i):
            return gradients([x[i:i + 1, :sizes[i, k, 0], :sizes[i, k, 1]] for k, x in enumerate(images)], False)

        out = sum_loop(query.shape[0], one, init, unroll)
        return out[0], out[1:]
    if micro_batches == 1:
        out = gradients(images, True)
        return out[0], out[1:]
    size = query.shape[0] // micro_batches

    def part(i):
        return gradients([x[i * size:(i + 1) * size] for x in images], True)

    out = sum_loop(micro_batches, part, init, unroll)
    return out[0], out[1:]
