"""Training the region proposal network (DIR, IJCV 2017, Section 3.3): the
RPN learns the manifest's landmark boxes on frozen backbone features
(`RPNStage`, the trainer's RPN stages), and its weights are written and
read on their own (``rpn.weights.npz``).

TensorFlow only.
"""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from deep_retrieval.data import manifest as manifest_lib
from deep_retrieval.data import pipeline
from deep_retrieval.io.atomic import atomic_write
from deep_retrieval.model.descriptor_model import build_descriptor_model
from deep_retrieval.ranking import rpn_targets
from deep_retrieval.ranking.distribution import sum_loop
from deep_retrieval.ranking.training_data import common_size


class RPNStage:
    """The RPN stages of ranking training: the RPN of a model learns the
    manifest's landmark boxes on the features its backbone computes frozen.
    Its own loop, not ``fit``: the targets are assigned per batch from the
    boxes.

    Args:
        config: the run's `TrainConfig` (the ``rpn_*`` fields, ``image_size``,
            ``seed``, ``output_dir``).
        manifest: the training `Manifest` (its boxes).
        strategy: the run's ``tf.distribute`` strategy.
        chief: whether this worker writes files and logs.
        progress: show progress bars.
        log: prints one message.
    """

    def __init__(self, config, manifest, strategy, chief=True, progress=True, log=print):
        self.config, self.manifest, self.strategy = config, manifest, strategy
        self.chief, self.progress, self.log = chief, progress, log
        self.count = 0  # RPN steps taken
        self.size = None  # the boxed images' common size, or None
        self._iterator = None
        self._layer = None  # the RPN layer the optimizer and step are built for

    def _distributed_step(self, model, images, boxes, sizes, seed):
        c = self.config
        layer = model.head.rpn
        variables = layer.weights
        replicas = self.strategy.num_replicas_in_sync

        def gradients(images, boxes, seed):
            """``([total, objectness, box, positives], grads)`` of one block of
            images of one size."""
            features = model.backbone(model.preprocess(images), training=False)
            features = tf.stop_gradient(features)
            cells = tf.cast(tf.shape(features)[1:3], tf.float32)
            gt = boxes * tf.stack([cells[1], cells[0], cells[1], cells[0]])
            with tf.GradientTape() as tape:
                logits, deltas, anchors = layer.raw_outputs(features)
                keys = tf.random.stateless_uniform(tf.shape(logits), seed)
                labels, targets = rpn_targets.assign_targets(
                    anchors, gt, tf.ones(tf.shape(gt)[:1], tf.bool), keys,
                    anchors_per_image=c.rpn_anchors_per_image,
                )
                total, objectness, box = rpn_targets.rpn_loss(logits, deltas, labels, targets)
            grads = tape.gradient(total, variables)
            positives = tf.reduce_sum(tf.cast(labels == 1, tf.float32))
            return tf.stack([total, objectness, box, positives]), grads

        def step_fn(images, boxes, sizes, seed):
            if self.size is not None:  # one size: one block, of a static shape
                stats, grads = gradients(images, boxes, seed)
            else:  # each image on its own at its own size, losses averaged
                def one(i):
                    image = images[i:i + 1, :sizes[i, 0], :sizes[i, 1]]
                    st, g = gradients(image, boxes[i:i + 1], seed + tf.stack([0, tf.cast(i, tf.int64) + 1]))
                    return [st] + list(g)

                count = images.shape[0]
                out = sum_loop(count, one, [tf.zeros([4])] + [tf.zeros_like(v) for v in variables])
                stats = out[0] / tf.constant([count, count, count, 1.0])
                grads = [g / count for g in out[1:]]
            self.optimizer.apply_gradients(zip([g / replicas for g in grads], variables))
            return stats / replicas

        per_replica = self.strategy.run(step_fn, args=(images, boxes, sizes, seed))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def train(self, model):
        """Stage 1: ``model``'s RPN learns the manifest's boxes, backbone frozen.

        Writes ``rpn.weights.npz`` to the output folder. With
        ``rpn_checkpoint`` set, loads those weights instead of training.
        """
        c = self.config
        layer = model.head.rpn
        if c.rpn_checkpoint:
            load_rpn_weights(layer, c.rpn_checkpoint)
            self.log(f"RPN weights loaded from {c.rpn_checkpoint}")
            if c.rpn_refresh_steps:
                self.prepare()  # refreshes need boxes: fail now, not mid-training
            return
        self.steps(model, c.rpn_steps, "RPN on the frozen backbone")
        if self.chief:
            path = os.path.join(c.output_dir, "rpn.weights.npz")
            save_rpn_weights(layer, path)
            self.log(f"RPN trained: weights saved to {path}")

    def prepare(self):
        """The boxed images' input (made once); a ValueError when the
        manifest has too few boxes."""
        if self._iterator is not None:
            return
        c = self.config
        frame = self.manifest.frame
        has_box = self.manifest.has_boxes
        if not has_box.any():
            raise ValueError(
                "--regions rpn needs landmark boxes to train the RPN, and the manifest has "
                "no valid x0,y0,x1,y1 box (see python -m training.clean); or pass "
                "--rpn_checkpoint (with --rpn_refresh_steps 0)."
            )
        if has_box.sum() < c.rpn_batch_size:
            raise ValueError(
                f"only {int(has_box.sum())} images have a box, fewer than --rpn_batch_size "
                f"{c.rpn_batch_size}."
            )
        boxed = frame[has_box]
        self.size = common_size(boxed, c.image_size)
        size = boxed[["width", "height", "width", "height"]].to_numpy(np.float64)
        boxes = boxed[list(manifest_lib.BOX_COLUMNS)].to_numpy(np.float64) / size
        self.log(
            f"RPN training on the boxes of {len(boxed)} images "
            f"({len(frame) - len(boxed)} images without a box do not take part)"
        )
        paths = boxed["path"].tolist()

        def dataset_fn(context):
            shard = None
            if context.num_input_pipelines > 1:
                shard = (context.num_input_pipelines, context.input_pipeline_id)
            return pipeline.box_dataset(
                paths, boxes, c.image_size,
                context.get_per_replica_batch_size(c.rpn_batch_size), c.seed, shard=shard,
                size=self.size,
            )

        self._iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
        self._writer = (tf.summary.create_file_writer(os.path.join(c.output_dir, "tensorboard", "rpn"))
                        if self.chief else tf.summary.create_noop_writer())

    def _bind(self, model):
        """The optimizer and the compiled step of ``model``'s RPN (rebuilt
        when the model changes: the paper order attaches a new one)."""
        if self._layer is model.head.rpn:
            return
        with self.strategy.scope():
            self.optimizer = keras.optimizers.Adam(self.config.rpn_learning_rate)
            self.optimizer.build(model.head.rpn.weights)
        self._step = tf.function(lambda *args: self._distributed_step(model, *args))
        self._layer = model.head.rpn

    def attach(self, model, descriptor, image_size):
        """A model of ``descriptor`` (regions ``rpn``) holding the ranked
        backbone and whitening of the grid model ``model``: the paper
        order ranks with the rigid grid, then the RPN learns the boxes on
        those frozen features (`train`)."""
        with self.strategy.scope():
            other = build_descriptor_model(dataclasses.replace(descriptor, weights=None), image_size)
            other.backbone.set_weights(model.backbone.get_weights())
            if other.head.pca is not None:
                other.head.pca.set_weights(model.head.pca.get_weights())
        return other

    def steps(self, model, count, desc):
        """``count`` training steps of ``model``'s RPN on its current (frozen) backbone."""
        self.prepare()
        self._bind(model)
        c = self.config
        bar = tqdm(total=count, desc=desc, unit="step", disable=not (self.progress and self.chief))
        for _ in range(count):
            seed = tf.constant([c.seed, self.count], tf.int64)
            total, objectness, box, positives = self._step(*next(self._iterator), seed).numpy()
            with self._writer.as_default():
                tf.summary.scalar("rpn/loss", total, step=self.count)
                tf.summary.scalar("rpn/objectness", objectness, step=self.count)
                tf.summary.scalar("rpn/box", box, step=self.count)
            self.count += 1
            bar.set_postfix(loss=f"{total:.4f}", positives=f"{positives:.0f}")
            bar.update()
        bar.close()


def _weight_names(layer):
    """``{name within the layer: variable}``, e.g. ``conv/kernel``: the same
    wherever the layer sits in a model."""
    prefix = layer.path + "/"
    if not all(v.path.startswith(prefix) for v in layer.weights):
        raise ValueError(f"weights of {layer.path} outside its path: {[v.path for v in layer.weights]}")
    return {v.path[len(prefix):]: v for v in layer.weights}


def save_rpn_weights(layer, path):
    """Writes an RPN layer's weights to ``path`` (``.npz``) atomically."""
    atomic_write(path, lambda tmp: np.savez(tmp, **{k: np.asarray(v) for k, v in _weight_names(layer).items()}),
                 ".npz")


def load_rpn_weights(layer, path):
    """Loads RPN weights from ``rpn.weights.npz`` or from a ``.keras`` model
    trained with ``regions="rpn"``; shapes must match."""
    if not os.path.isfile(path):
        raise ValueError(f"--rpn_checkpoint {path}: no such file.")
    if path.endswith(".keras"):
        source = keras.models.load_model(path).head.rpn
        if source is None:
            raise ValueError(f"--rpn_checkpoint {path}: that model has no RPN (regions='grid').")
        values = {k: np.asarray(v) for k, v in _weight_names(source).items()}
    else:
        with np.load(path) as data:
            values = dict(data)
    for name, v in _weight_names(layer).items():
        if name not in values or values[name].shape != tuple(v.shape):
            raise ValueError(
                f"--rpn_checkpoint {path}: no weight {name!r} of shape {tuple(v.shape)} "
                "(an RPN of another backbone or anchor set?)."
            )
        v.assign(values[name])
