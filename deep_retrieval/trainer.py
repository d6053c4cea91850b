"""DIR ranking training: the three-stream siamese model under tf.distribute.

One descriptor model embeds query, positive and negative images (shared
weights); the loss is the triplet ranking loss; negatives are re-mined with
the current model every ``mine_every`` steps. Before ranking training the
PCA-whitening layer is fitted to region descriptors of training images, and
that model (pretrained backbone plus whitening) is saved as
``initial.keras``. A pretrained backbone's batch-norm statistics stay
frozen, as in the reference code; ``train_from`` freezes its first layers.

With ``regions="rpn"`` training has two stages. ``rpn_order="grid_first"``
(the default) follows DIR's IJCV 2017 description: the ranking network is
trained with the rigid grid, then the region proposal network learns the
manifest's landmark boxes on that network's frozen convolutional features
(`attach_rpn`, `train_rpn`), and the model then pools the RPN's proposals.
``"rpn_first"`` trains the RPN on the pretrained backbone first and then
the ranking through its (frozen) proposals; with ``rpn_refresh_steps`` the
RPN is re-fitted to the current backbone at every mining round and at the
end, for a backbone trained from scratch, whose features move far from
those the RPN first saw.

TensorFlow only (tf.data, tf.distribute, tf.train.Checkpoint).
"""

import dataclasses
import json
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from deep_retrieval import evaluation, extraction, functional, losses, mining, rpn_targets, whitening
from deep_retrieval.data import groundtruth, pipeline, synthetic
from deep_retrieval.data import manifest as manifest_lib
from deep_retrieval.data.images import scaled_shape
from deep_retrieval.files import atomic_write
from deep_retrieval.model import build_descriptor_model


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


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def _worker_index(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    return resolver.task_id


@dataclasses.dataclass
class TrainingData:
    """Resolved training and evaluation inputs."""

    manifest: manifest_lib.Manifest
    eval_dataset: object


def resolve_data(config, progress=True):
    """Reads the manifest (generating the synthetic dataset if none is given)
    and the evaluation benchmark."""
    manifest_path, data_dir = config.manifest, config.data_dir
    eval_root, eval_name = config.eval_root, config.eval_dataset
    if manifest_path and config.instances_dir:
        raise ValueError("give --manifest or --instances_dir, not both")
    if not manifest_path:
        source = config.synthetic
        if config.instances_dir:
            source = dataclasses.replace(
                source, source="folder", photos_dir=os.path.abspath(config.instances_dir)
            )
        root = synthetic.ensure_dataset(source, progress=progress)
        manifest_path, data_dir = os.path.join(root, "train.csv"), root
        eval_root = eval_root or root
        eval_name = eval_name or synthetic.DATASET_NAME
    data_dir = data_dir or os.path.dirname(os.path.abspath(manifest_path))
    manifest = manifest_lib.read_manifest(
        manifest_path, data_dir, allow_outside=config.allow_outside_data_dir
    )
    if len(manifest.frame) < 2:
        raise ValueError(f"{manifest_path}: no usable training images ({manifest.summary()}).")
    dataset = groundtruth.load_dataset(eval_root, eval_name) if eval_root and eval_name else None
    return TrainingData(manifest, dataset)


class Trainer:
    """Runs `TrainConfig` end to end; see `run`."""

    def __init__(self, config, strategy=None, progress=True):
        self.config = config
        self.strategy = strategy or make_strategy(config.strategy)
        self.progress = progress
        self.chief = _is_chief(self.strategy)
        self.worker_index = _worker_index(self.strategy)
        keras.utils.set_random_seed(config.seed)
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % (replicas * config.accumulate_steps):
            raise ValueError(f"--batch_size {config.batch_size} must split into {replicas} replica(s) x "
                             f"{config.accumulate_steps} micro-batch(es) (--accumulate_steps)")
        self.data = resolve_data(config, progress=progress and self.chief)
        frame = self.data.manifest.frame
        self.paths = frame["path"].tolist()
        self.labels = frame["label"].to_numpy()
        self.unusable = set()  # indices that failed to decode in mining
        # Training images keep their aspect ratio: one size for all (one
        # aspect ratio) runs batches as blocks, mixed sizes triplet by triplet.
        self.train_size = _common_size(frame, config.image_size)
        self.synchronized_bn = False
        # The paper order ranks with the rigid grid; the RPN comes after.
        self.rpn_after = config.descriptor.regions == "rpn" and config.rpn_order == "grid_first"
        ranking = dataclasses.replace(config.descriptor, regions="grid") if self.rpn_after else config.descriptor
        with self.strategy.scope():
            self.model = build_descriptor_model(ranking, config.image_size)
            for layer in self.model.backbone.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    if config.descriptor.weights is not None:
                        # Pretrained statistics stay frozen, as in the
                        # reference code (triplet batches are small and
                        # correlated).
                        layer.trainable = False
                    elif self.strategy.num_replicas_in_sync > 1:
                        # From scratch they keep learning, from the statistics
                        # of the global batch so that replicas stay equal.
                        layer.synchronized = True
                        self.synchronized_bn = True
            if config.train_from:
                freeze_backbone_before(self.model.backbone, config.train_from)
            if self.model.head.rpn is not None:
                # Ranking leaves the RPN as its first stage trained it.
                self.model.head.rpn.trainable = False
            self.optimizer = self._optimizer()
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, step=self.step
        )
        os.makedirs(config.output_dir, exist_ok=True)
        if self.chief:
            with open(os.path.join(config.output_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(config), f, indent=1, default=str)
        ckpt_dir = os.path.join(config.output_dir, "checkpoints")
        if not self.chief:
            ckpt_dir = tempfile.mkdtemp(prefix=f"worker{self.worker_index}_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir, max_to_keep=3)
        self.writer = (
            tf.summary.create_file_writer(os.path.join(config.output_dir, "tensorboard"))
            if self.chief
            else tf.summary.create_noop_writer()
        )
        self._train_step = tf.function(self._distributed_step)
        self._compile_inference()

    @property
    def mixed_sizes(self):
        """The training images differ in size at ``image_size``."""
        return self.train_size is None

    def _compile_inference(self):
        """Mining's single-scale embedding and evaluation's describer, of the
        current model."""
        self._embed_single = extraction.compiled_single_scale(self.model)
        self._describe = extraction.model_describer(
            self.model, self.config.image_size, progress=self.progress
        )

    def _optimizer(self):
        c = self.config
        decoupled = (c.weight_decay or None) if c.weight_decay_mode == "decoupled" else None
        if c.optimizer == "adam":
            return keras.optimizers.Adam(c.learning_rate, weight_decay=decoupled)
        if c.optimizer == "sgd":
            return keras.optimizers.SGD(c.learning_rate, momentum=c.momentum, weight_decay=decoupled)
        raise ValueError(f"Unknown optimizer {c.optimizer!r}; use adam or sgd.")

    # ----------------------------------------------------------------- steps

    def _distributed_step(self, query, positive, negative, sizes):
        c = self.config

        def step_fn(q, p, n, s):
            variables = self.model.trainable_variables
            loss, grads = ranking_gradients(
                self.model, variables, q, p, n, c.margin, c.batch_size, c.accumulate_steps,
                s if self.mixed_sizes else None, unroll=self.synchronized_bn,
            )
            if c.weight_decay and c.weight_decay_mode == "l2":
                grads = [g + c.weight_decay * v for g, v in zip(grads, variables)]
            self.optimizer.apply_gradients(zip(grads, variables))
            return loss

        per_replica = self.strategy.run(step_fn, args=(query, positive, negative, sizes))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _distributed_rpn_step(self, images, boxes, sizes, seed):
        c = self.config
        layer = self.model.head.rpn
        variables = layer.weights
        replicas = self.strategy.num_replicas_in_sync

        def gradients(images, boxes, seed):
            """``([total, objectness, box, positives], grads)`` of one block of
            images of one size."""
            features = self.model.backbone(self.model.preprocess(images), training=False)
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
            if self._rpn_size is not None:  # one size: one block, of a static shape
                stats, grads = gradients(images, boxes, seed)
            else:  # each image on its own at its own size, losses averaged
                def one(i):
                    image = images[i:i + 1, :sizes[i, 0], :sizes[i, 1]]
                    st, g = gradients(image, boxes[i:i + 1], seed + tf.stack([0, tf.cast(i, tf.int64) + 1]))
                    return [st] + list(g)

                count = images.shape[0]
                out = _sum_loop(count, one, [tf.zeros([4])] + [tf.zeros_like(v) for v in variables], False)
                stats = out[0] / tf.constant([count, count, count, 1.0])
                grads = [g / count for g in out[1:]]
            self.rpn_optimizer.apply_gradients(zip([g / replicas for g in grads], variables))
            return stats / replicas

        per_replica = self.strategy.run(step_fn, args=(images, boxes, sizes, seed))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    # ------------------------------------------------------------ components

    def train_rpn(self):
        """Stage 1: the RPN learns the manifest's boxes, backbone frozen.

        Writes ``rpn.weights.npz`` to the output folder. With
        ``rpn_checkpoint`` set, loads those weights instead of training.
        """
        c = self.config
        layer = self.model.head.rpn
        if c.rpn_checkpoint:
            load_rpn_weights(layer, c.rpn_checkpoint)
            self._log(f"RPN weights loaded from {c.rpn_checkpoint}")
            if c.rpn_refresh_steps:
                self._rpn_input()  # refreshes need boxes: fail now, not mid-training
            return
        self.rpn_steps(c.rpn_steps, "RPN on the frozen backbone")
        if self.chief:
            path = os.path.join(c.output_dir, "rpn.weights.npz")
            save_rpn_weights(layer, path)
            self._log(f"RPN trained: weights saved to {path}")

    def _rpn_input(self):
        """The boxed images (iterator), the RPN optimizer and step, made once."""
        if getattr(self, "_rpn_iterator", None) is not None:
            return
        c = self.config
        frame = self.data.manifest.frame
        has_box = self.data.manifest.has_boxes
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
        self._rpn_size = _common_size(boxed, c.image_size)
        size = boxed[["width", "height", "width", "height"]].to_numpy(np.float64)
        boxes = boxed[list(manifest_lib.BOX_COLUMNS)].to_numpy(np.float64) / size
        self._log(
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
                size=self._rpn_size,
            )

        with self.strategy.scope():
            self.rpn_optimizer = keras.optimizers.Adam(c.rpn_learning_rate)
            self.rpn_optimizer.build(self.model.head.rpn.weights)
        self._rpn_iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
        self._rpn_step = tf.function(self._distributed_rpn_step)
        self._rpn_count = 0

    def rpn_steps(self, count, desc):
        """``count`` RPN training steps on the current (frozen) backbone."""
        self._rpn_input()
        c = self.config
        bar = tqdm(total=count, desc=desc, unit="step", disable=not (self.progress and self.chief))
        for _ in range(count):
            seed = tf.constant([c.seed, self._rpn_count], tf.int64)
            total, objectness, box, positives = self._rpn_step(*next(self._rpn_iterator), seed).numpy()
            with self.writer.as_default():
                tf.summary.scalar("rpn/loss", total, step=self._rpn_count)
                tf.summary.scalar("rpn/objectness", objectness, step=self._rpn_count)
                tf.summary.scalar("rpn/box", box, step=self._rpn_count)
            self._rpn_count += 1
            bar.set_postfix(loss=f"{total:.4f}", positives=f"{positives:.0f}")
            bar.update()
        bar.close()

    def attach_rpn(self):
        """The paper order's second stage: a model with the RPN takes the
        ranked backbone and whitening, the RPN learns the boxes on those
        frozen features (`train_rpn`), and the model pools its proposals
        from then on."""
        with self.strategy.scope():
            model = build_descriptor_model(dataclasses.replace(self.config.descriptor, weights=None),
                                           self.config.image_size)
            model.backbone.set_weights(self.model.backbone.get_weights())
            if model.head.pca is not None:
                model.head.pca.set_weights(self.model.head.pca.get_weights())
        self.model = model
        self._compile_inference()
        self._log("ranking with the rigid grid done: training the RPN on its features")
        self.train_rpn()

    def init_whitening(self):
        """Fits the PCA-whitening layer to region descriptors of training images."""
        pca = self.model.head.pca
        if pca is None:
            return
        rng = np.random.default_rng([self.config.seed, 11])
        count = min(self.config.whitening_images, len(self.paths))
        chosen = rng.choice(len(self.paths), count, replace=False)
        pool = extraction.compiled_fn(
            lambda x: self.model.head.pool_regions(self.model.backbone(self.model.preprocess(x)))
        )
        regions = []
        desc = "whitening: region descriptors"
        with tqdm(total=count, desc=desc, unit="img", disable=not (self.progress and self.chief)) as bar:
            for _, (image,) in pipeline.image_dataset([self.paths[i] for i in chosen], self.config.image_size):
                pooled, valid = pool(image[None])
                pooled = np.asarray(functional.l2_normalize(pooled))[0]
                valid = np.asarray(valid)
                regions.append(pooled[valid[0] if valid.ndim == 2 else valid])
                bar.update()
        regions = np.concatenate(regions)
        whitening.init_whitening(pca, regions, self.config.whitening_power)
        self._log(f"whitening fitted on {len(regions)} regions of {count} images")

    def mine(self, round_index):
        """Embeds the mining pool, mines hard negatives, returns triplets."""
        c = self.config
        rng = np.random.default_rng([c.seed, 13, round_index])
        n = len(self.paths)
        everything = not c.pool_size or c.pool_size >= n
        pool = np.arange(n) if everything else np.sort(rng.choice(n, c.pool_size, replace=False))
        desc, failed = extraction.extract(
            self._embed_single, [self.paths[i] for i in pool], c.image_size,
            progress=self.progress and self.chief, desc=f"mining round {round_index}", strict=False,
        )
        if len(failed):
            # Images that read at startup but no longer decode: reported and
            # kept out of every later triplet, never dropped silently.
            new = set(pool[failed].tolist()) - self.unusable
            self.unusable |= new
            names = ", ".join(os.path.basename(self.paths[i]) for i in sorted(new)[:5])
            self._log(f"mining round {round_index}: {len(failed)} image(s) failed to decode and are left out "
                      f"of training ({len(self.unusable)} in all so far){': ' + names if new else ''}"
                      f"{' ...' if len(new) > 5 else ''}")
        with self.writer.as_default():
            tf.summary.scalar("data/unusable_images", len(self.unusable), step=round_index)
        keep = np.setdiff1d(np.arange(len(pool)), failed)
        pool, desc = pool[keep], desc[keep]
        labels = self.labels[pool]
        negatives = mining.hard_negatives(desc, labels, desc, labels, c.num_negatives)
        negatives = np.where(negatives >= 0, pool[np.maximum(negatives, 0)], -1)
        return mining.sample_triplets(self.labels, negatives, rng, queries=pool, exclude=self.unusable)

    def triplet_iterator(self, triplets, round_index):
        """An endless iterator of distributed triplet batches for one round."""
        c = self.config
        seed = c.seed * 100003 + round_index

        def dataset_fn(context):
            shard = None
            if context.num_input_pipelines > 1:
                shard = (context.num_input_pipelines, context.input_pipeline_id)
            return pipeline.triplet_dataset(
                self.paths, triplets, c.image_size,
                context.get_per_replica_batch_size(c.batch_size), seed, shard=shard, repeat=True,
                size=self.train_size,
            )

        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def evaluate(self, step):
        """Scores the held-out benchmark; appends to metrics.jsonl (chief)."""
        if self.data.eval_dataset is None or not self.chief:
            return None
        start = time.time()
        results = extraction.evaluate_model(self._describe, self.data.eval_dataset)
        record = {"step": int(step), "time": round(time.time() - start, 2)}
        for protocol, values in results.items():
            for key, value in values.items():
                record[f"{protocol}_{key.replace('@', '')}"] = round(float(value), 3)
        with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        with self.writer.as_default():
            for key, value in record.items():
                if key not in ("step", "time"):
                    tf.summary.scalar(f"eval/{key}", value, step=int(step))
        self._log(f"evaluation at step {step}:\n{evaluation.format_table(results)}")
        return results

    def save_model(self, name="model.keras"):
        """Writes ``name`` (model.keras) in the output folder atomically (chief only)."""
        if not self.chief:
            return None
        return atomic_write(os.path.join(self.config.output_dir, name), self.model.save, ".keras")

    def _log(self, message):
        if self.chief:
            tqdm.write(message)

    # ------------------------------------------------------------------ run

    def restore_or_start(self):
        """Restores the latest checkpoint when resuming; refuses to overwrite."""
        latest = self.manager.latest_checkpoint
        if self.chief and not self.config.resume and latest:
            raise ValueError(
                f"{self.config.output_dir} already holds checkpoints ({latest}); pass "
                "--resume to continue that run or choose another --output_dir."
            )
        if self.config.resume and latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self._log(f"resumed from {latest} at step {int(self.step.numpy())}")
            return True
        if self.config.resume:
            self._log("no checkpoint to resume from: starting a new run")
        return False

    def run(self):
        """Trains; returns the path of model.keras (None on non-chief workers)."""
        c = self.config
        self._log(f"training data: {self.data.manifest.summary()}")
        for kind, problems in (("skipped", self.data.manifest.problems),
                               ("kept", self.data.manifest.box_problems)):
            for problem in problems[:20]:
                self._log(f"  {kind} {problem}")
            if len(problems) > 20:
                self._log(f"  ... and {len(problems) - 20} more")
        resumed = self.restore_or_start()
        if not resumed:
            if self.model.head.rpn is not None:
                self.train_rpn()
            self.init_whitening()
            # The model before ranking training (pretrained backbone plus
            # fitted whitening), so what training buys can be measured.
            self.save_model(INITIAL_MODEL)
            self.evaluate(0)
            self.manager.save(checkpoint_number=0)
        step = int(self.step.numpy())
        bar = tqdm(total=c.steps, initial=step, desc="training", unit="step",
                   disable=not (self.progress and self.chief))
        iterator = None
        while step < c.steps:
            if iterator is None or step % c.mine_every == 0:
                if step and self.model.head.rpn is not None and c.rpn_refresh_steps:
                    self.rpn_steps(c.rpn_refresh_steps, f"RPN refresh at step {step}")
                # A resumed run re-mines with the restored weights.
                round_index = step // c.mine_every
                triplets = self.mine(round_index)
                if len(triplets) == 0:
                    raise ValueError("mining produced no triplet: every label needs two images "
                                     "and other labels must exist")
                iterator = self.triplet_iterator(triplets, round_index)
            loss = float(self._train_step(*next(iterator)))
            step += 1
            self.step.assign(step)
            with self.writer.as_default():
                tf.summary.scalar("train/loss", loss, step=step)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
            if step % c.checkpoint_every == 0 or step == c.steps:
                self.manager.save(checkpoint_number=step)
            if c.eval_every and step % c.eval_every == 0 and step != c.steps:
                self.evaluate(step)
        bar.close()
        if self.rpn_after:
            self.attach_rpn()
        elif self.model.head.rpn is not None and c.rpn_refresh_steps:
            self.rpn_steps(c.rpn_refresh_steps, "RPN refresh (final)")
        self.evaluate(step)
        self.writer.flush()
        return self.save_model()


INITIAL_MODEL = "initial.keras"


def _common_size(frame, longest):
    """The ``(height, width)`` every image of ``frame`` has at ``longest``
    (`scaled_shape`), or None when they differ."""
    sizes = {scaled_shape(h, w, longest) for h, w in zip(frame["height"], frame["width"])}
    return sizes.pop() if len(sizes) == 1 else None


def _sum_loop(count, body, init, unroll):
    """``init`` plus ``body(i)`` summed over ``i < count``, one ``i`` after the
    other: a `tf.while_loop`, or a Python loop when ``unroll`` (synchronized
    batch norm cannot sit inside control flow)."""
    add = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731
    if unroll:
        total = init
        for i in range(count):
            total = add(total, body(i))
        return total
    _, total = tf.while_loop(
        lambda i, _: i < count, lambda i, t: (i + 1, add(t, body(i))), (tf.constant(0), init),
        parallel_iterations=1,
    )
    return total


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

        out = _sum_loop(query.shape[0], one, init, unroll)
        return out[0], out[1:]
    if micro_batches == 1:
        out = gradients(images, True)
        return out[0], out[1:]
    size = query.shape[0] // micro_batches

    def part(i):
        return gradients([x[i * size:(i + 1) * size] for x in images], True)

    out = _sum_loop(micro_batches, part, init, unroll)
    return out[0], out[1:]


def freeze_backbone_before(backbone, name):
    """Freezes every backbone layer before the first one named ``name`` or
    ``name_...``; raises ValueError listing candidates when none is."""
    layers = backbone.layers
    for index, layer in enumerate(layers):
        if layer.name == name or layer.name.startswith(f"{name}_"):
            for frozen in layers[:index]:
                frozen.trainable = False
            return index
    names = [layer.name for layer in layers if layer.weights]
    raise ValueError(
        f"--train_from {name!r}: no layer of the {backbone.name} backbone has that name "
        f"(layers with weights: {', '.join(names[:3])}, ..., {', '.join(names[-3:])})"
    )


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
