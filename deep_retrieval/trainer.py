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

from deep_retrieval import evaluation, extraction, functional, mining, whitening
from deep_retrieval.backbones import freeze_backbone_before
from deep_retrieval.data import pipeline
from deep_retrieval.distribution import is_chief, make_strategy, worker_index
from deep_retrieval.files import atomic_write
from deep_retrieval.model import build_descriptor_model
from deep_retrieval.ranking import ranking_gradients
from deep_retrieval.rpn_training import RPNTraining
from deep_retrieval.training_data import common_size, resolve_data


class Trainer(RPNTraining):
    """Runs `TrainConfig` end to end; see `run`."""

    def __init__(self, config, strategy=None, progress=True):
        self.config = config
        self.strategy = strategy or make_strategy(config.strategy)
        self.progress = progress
        self.chief = is_chief(self.strategy)
        self.worker_index = worker_index(self.strategy)
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
        self.train_size = common_size(frame, config.image_size)
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

    # ------------------------------------------------------------ components

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
