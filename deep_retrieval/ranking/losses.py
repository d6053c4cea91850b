"""The triplet ranking loss of DIR, in `keras.ops` (no tensorflow-addons)."""

from keras import ops


def triplet_ranking_loss(query, positive, negative, margin=0.1):
    """``mean(max(0, margin + ||q - p||^2 - ||q - n||^2))``.

    Args:
        query, positive, negative: ``[B, D]`` descriptors (L2-normalised in
            DIR, though the loss does not require it).
        margin: the ranking margin ``m`` (DIR uses 0.1).

    Returns:
        A scalar: the mean hinge over the ``B`` triplets.

    Reference:
        Gordo et al., "Deep Image Retrieval", ECCV 2016, Eq. (1).
    """
    return triplet_ranking_loss_sum(query, positive, negative, margin) / ops.cast(ops.shape(query)[0], "float32")


def triplet_ranking_loss_sum(query, positive, negative, margin=0.1):
    """The sum of the per-triplet hinges (for averaging over a global batch
    split across replicas)."""
    d_pos = ops.sum(ops.square(query - positive), axis=-1)
    d_neg = ops.sum(ops.square(query - negative), axis=-1)
    return ops.sum(ops.relu(margin + d_pos - d_neg))
