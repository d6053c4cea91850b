"""The three-stream siamese network of DIR training (Gordo et al., ECCV 2016,
Section 4.1): one descriptor model, shared by the query, positive and
negative streams, trained with the triplet ranking loss.

`RankingModel` is an ordinary `keras.Model`: it overrides `compute_loss`
only, so Keras's own ``train_step`` runs it on every backend (TensorFlow,
with or without `tf.distribute`, and JAX), and ``fit`` drives it.
"""

import keras
from keras import ops

from deep_retrieval.ranking import losses

STREAMS = ("query", "positive", "negative")


class RankingModel(keras.Model):
    """Query, positive and negative images through one descriptor model.

    Args:
        descriptor: the `DescriptorModel` being trained (its descriptor at
            the input's own scale, `DescriptorModel.single_scale`).
        margin: the ranking margin ``m``.
        triplets_per_step: triplets in one call over all replicas; the loss
            is the sum of their hinges divided by it, so the gradients that
            replicas sum (and that Keras's gradient accumulation averages)
            are those of the mean over the whole batch.
        weight_decay: Caffe-style L2 decay ``lambda``: adds
            ``lambda / 2 * ||w||^2`` of the trainable weights to the loss,
            i.e. ``lambda * w`` to every gradient (0: none).
        replicas: replicas whose gradients are summed (the decay and
            distillation terms are divided by it, so they are counted once).
        l2_sp: L2-SP strength ``beta`` (Li et al., ICML 2018): adds
            ``beta / 2 * ||w - w0||^2`` of the trainable weights to the loss,
            ``w0`` their values at `set_start_point` (0: none). It keeps
            training near the pretrained model rather than near zero.
        distill: distillation strength ``gamma``: adds ``gamma`` times the
            mean over the step's images of ``||d(x) - d0(x)||^2``, ``d0`` the
            descriptor with the weights at `set_start_point` (0: none). It
            keeps the descriptor near the one training starts from, where
            L2-SP keeps the weights.
        vector_logs: step logs as ``[1]`` tensors, for TensorFlow's
            `MultiWorkerMirroredStrategy`: Keras 3 averages logs over workers
            along an axis a scalar lacks (tensorflow/tensorflow#72388).

    Call arguments:
        inputs: the triplets' images: ``[B, 3, H, W, 3]`` (query, positive
            and negative stacked, one size; the three run as one batch), or a
            dict of ``[B, H, W, 3]`` images under ``"query"``, ``"positive"``
            and ``"negative"`` (each stream at its own size).

    Returns ``[B, 3, D]``: the query, positive and negative descriptors.

    Example:

    >>> ranking = RankingModel(descriptor_model, margin=0.1, triplets_per_step=8)
    >>> ranking.compile(optimizer=keras.optimizers.Adam(1e-6))
    >>> ranking.fit(triplets, epochs=rounds, callbacks=[...])
    """

    def __init__(self, descriptor, margin, triplets_per_step, weight_decay=0.0, replicas=1, vector_logs=False,
                 l2_sp=0.0, distill=0.0, **kwargs):
        super().__init__(**kwargs)
        self.vector_logs = vector_logs
        self.descriptor = descriptor
        self.margin = margin
        self.triplets_per_step = triplets_per_step
        self.weight_decay = weight_decay
        self.replicas = replicas
        self.l2_sp, self.distill = l2_sp, distill
        # The start point of L2-SP and distillation: non-trainable copies,
        # saved with the model's weights (so a resumed run keeps them).
        self.start_point = [
            self.add_weight(shape=v.shape, initializer="zeros", trainable=False, name=f"start_{i}")
            for i, v in enumerate(descriptor.trainable_variables)
        ] if l2_sp or distill else []
        # Every weight belongs to the (built) descriptor model.
        self.built = True

    def set_start_point(self):
        """Takes the trainable weights' current values as the start point
        ``w0`` that L2-SP and distillation pull toward."""
        for start, v in zip(self.start_point, self.descriptor.trainable_variables):
            start.assign(v)

    def call(self, inputs, training=None):
        if isinstance(inputs, dict):
            images = [inputs[name] for name in STREAMS]
            return ops.stack([self.descriptor.single_scale(x, training=training) for x in images], axis=1)
        # Stream-major, so that the three streams' images sit in three blocks.
        images = ops.reshape(ops.swapaxes(inputs, 0, 1), (-1,) + tuple(inputs.shape[2:]))
        descriptors = self.descriptor.single_scale(images, training=training)
        return ops.stack(ops.split(descriptors, 3, axis=0), axis=1)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The triplet ranking loss of the call (Eq. 1), summed over its
        triplets and divided by ``triplets_per_step``, plus the L2 decay,
        L2-SP and distillation."""
        query, positive, negative = (y_pred[:, k] for k in range(3))
        loss = losses.triplet_ranking_loss_sum(query, positive, negative, self.margin) / self.triplets_per_step
        if self.weight_decay:
            squares = sum(ops.sum(ops.square(v)) for v in self.trainable_variables)
            loss = loss + 0.5 * self.weight_decay * squares / self.replicas
        if self.l2_sp:
            moved = sum(ops.sum(ops.square(v - w0))
                        for v, w0 in zip(self.descriptor.trainable_variables, self.start_point))
            loss = loss + 0.5 * self.l2_sp * moved / self.replicas
        if self.distill:
            drift = ops.mean(ops.sum(ops.square(y_pred - self.start_descriptors(x)), axis=-1))
            loss = loss + self.distill * drift / self.replicas
        return loss

    def start_descriptors(self, inputs):
        """The call's descriptors with the start-point weights (no gradient):
        the same network, its trainable variables read as `start_point`."""
        with keras.StatelessScope(state_mapping=list(zip(self.descriptor.trainable_variables, self.start_point))):
            return ops.stop_gradient(self(inputs, training=False))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if self.vector_logs:
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs


def make_optimizer(config, micro_steps=1):
    """The `TrainConfig`'s optimizer (Adam or SGD, decoupled weight decay),
    accumulating ``micro_steps`` micro-batches per step."""
    c = config
    options = dict(weight_decay=(c.weight_decay or None) if c.weight_decay_mode == "decoupled" else None,
                   gradient_accumulation_steps=micro_steps if micro_steps > 1 else None)
    if c.optimizer == "adam":
        return keras.optimizers.Adam(c.learning_rate, **options)
    if c.optimizer == "sgd":
        return keras.optimizers.SGD(c.learning_rate, momentum=c.momentum, **options)
    raise ValueError(f"Unknown optimizer {c.optimizer!r}; use adam or sgd.")
