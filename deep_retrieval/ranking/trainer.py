"""DIR ranking training, the Keras way: ``fit`` of the three-stream siamese
`RankingModel`, one epoch per mining round.

One descriptor model embeds query, positive and negative images (shared
weights); the loss is the triplet ranking loss; negatives are re-mined with
the current model every ``mine_every`` steps (`callbacks.Mining`), and
`callbacks.Backup` and ``TensorBoard`` keep the run's state and logs.
Before ranking training the PCA-whitening layer is fitted to region
descriptors of training images, and that model is saved as
``initial.keras``; `selection.Selection` keeps as ``model.keras`` the
round whose worst gain over step 0 across the validation splits is best,
step 0 included. A pretrained backbone's batch-norm
statistics stay frozen, as in the reference code; ``train_from`` freezes
its first layers.

With ``regions="rpn"`` the RPN stages are `rpn_stage.RPNStage`'s.
``rpn_order="grid_first"`` (the default, DIR IJCV 2017) ranks with the
rigid grid, then trains the RPN on that network's frozen features
(`attach_rpn`); ``"rpn_first"`` trains the RPN first and ranks through its
frozen proposals, re-fitted every round with ``rpn_refresh_steps``.

The input is tf.data. Under the TensorFlow backend the run can span
devices and workers with `tf.distribute`; under the JAX backend it runs on
one device (the RPN stages need TensorFlow).
"""

import contextlib
import dataclasses
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from deep_retrieval.backbones.registry import freeze_backbone_before, set_batch_norms
from deep_retrieval.data import pipeline
from deep_retrieval.data.images import diagnose
from deep_retrieval.io.atomic import atomic_text, atomic_write
from deep_retrieval.model import whitening
from deep_retrieval.model.descriptor_model import build_descriptor_model
from deep_retrieval.ops import functional
from deep_retrieval.ranking import callbacks, mining
from deep_retrieval.ranking.distribution import is_chief, make_strategy, worker_index
from deep_retrieval.ranking.frozen_trunk import TrainedPart, cache_run, split_backbone
from deep_retrieval.ranking.rpn_stage import RPNStage
from deep_retrieval.ranking.selection import Selection
from deep_retrieval.ranking.siamese import RankingModel, make_optimizer
from deep_retrieval.ranking.training_data import common_size, resolve_data
from deep_retrieval.ranking.triplets import TripletRounds
from deep_retrieval.retrieval import extraction


class Trainer:
    """Runs `TrainConfig` end to end; see `run`.

    Attributes:
        model: the `DescriptorModel` being trained.
        ranking: the `RankingModel` around it that ``fit`` trains.
    """

    def __init__(self, config, strategy=None, progress=True):
        self.config = config
        self.tensorflow = keras.backend.backend() == "tensorflow"
        if not self.tensorflow and (strategy is not None or config.strategy != "default"):
            raise ValueError(f"--strategy {config.strategy} is tf.distribute: it needs the TensorFlow backend "
                             f"(this is {keras.backend.backend()})")
        if not self.tensorflow and config.descriptor.regions == "rpn":
            raise ValueError("training the RPN needs the TensorFlow backend")
        self.strategy = (strategy or make_strategy(config.strategy)) if self.tensorflow else None
        self.progress = progress
        self.chief = is_chief(self.strategy) if self.tensorflow else True
        self.worker_index = worker_index(self.strategy) if self.tensorflow else 0
        keras.utils.set_random_seed(config.seed)
        replicas = self.strategy.num_replicas_in_sync if self.tensorflow else 1
        if config.batch_size % (replicas * config.accumulate_steps):
            raise ValueError(f"--batch_size {config.batch_size} must split into {replicas} replica(s) x "
                             f"{config.accumulate_steps} micro-batch(es) (--accumulate_steps)")
        self.data = resolve_data(config, progress=progress and self.chief)
        frame = self.data.manifest.frame
        self.paths = frame["path"].tolist()
        self.labels = frame["label"].to_numpy()
        self.sizes = frame[["height", "width"]].to_numpy()  # as the manifest read them
        self.unusable = set()  # indices that failed to decode in mining
        # Training images keep their aspect ratio: one size for all (one
        # aspect ratio) runs batches as blocks, mixed sizes triplet by
        # triplet, each image at its own size, gradients accumulated.
        self.train_size = common_size(frame, config.image_size)
        per_replica = config.batch_size // replicas
        self.micro_steps = per_replica if self.train_size is None else config.accumulate_steps
        if self.tensorflow and config.strategy != "default" and (self.micro_steps > 1 or self.train_size is None):
            raise ValueError("gradient accumulation (--accumulate_steps, or a collection of mixed image sizes) "
                             "runs on one replica: use --strategy default")
        # The paper order ranks with the rigid grid; the RPN comes after.
        self.rpn_after = config.descriptor.regions == "rpn" and config.rpn_order == "grid_first"
        ranking = dataclasses.replace(config.descriptor, regions="grid") if self.rpn_after else config.descriptor
        with self._scope():
            self.model = build_descriptor_model(ranking, config.image_size)
            set_batch_norms(self.model.backbone, config.descriptor.weights is not None, replicas)
            # What no longer trains is computed once (`frozen_trunk`): one
            # image size, grid regions while ranking.
            self.part = None
            if config.train_from and config.cache_features and self.train_size is not None \
                    and self.model.head.rpn is None:
                self.frozen, trained = split_backbone(self.model.backbone, config.train_from)
                self.part = TrainedPart(self.model, trained, name="trained_part")
            elif config.train_from:
                freeze_backbone_before(self.model.backbone, config.train_from)
            if self.model.head.rpn is not None:
                # Ranking leaves the RPN as its first stage trained it.
                self.model.head.rpn.trainable = False
            self.ranking = RankingModel(
                self.part or self.model, config.margin, config.batch_size // self.micro_steps,
                weight_decay=config.weight_decay if config.weight_decay_mode == "l2" else 0.0,
                replicas=replicas, l2_sp=config.l2_sp, distill=config.distill,
                vector_logs=self.tensorflow and isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy),
            )
            self.ranking.compile(optimizer=make_optimizer(config, self.micro_steps),
                                 jit_compile=False if self.tensorflow else "auto")
            self.ranking.optimizer.build(self.ranking.trainable_variables)
        backup_dir = os.path.join(config.output_dir, "checkpoints")
        if not self.chief:
            backup_dir = tempfile.mkdtemp(prefix=f"worker{self.worker_index}_backup_")
        self.backup = callbacks.Backup(backup_dir, config)
        self.rounds = TripletRounds(self.paths, config.image_size, config.batch_size, self.micro_steps,
                                    config.mine_every, config.seed, self.train_size)
        self.caches = None  # each benchmark's describer from its cached frozen-trunk maps
        self.selection = Selection(config.output_dir, self.data.eval_datasets, self.save_model, self._log)
        self.rpn = (RPNStage(config, self.data.manifest, self.strategy, self.chief, progress, self._log)
                    if config.descriptor.regions == "rpn" else None)
        self._compile_inference()

    def _scope(self):
        return self.strategy.scope() if self.tensorflow else contextlib.nullcontext()

    @property
    def step(self):
        """Optimizer steps taken."""
        return int(keras.ops.convert_to_numpy(self.ranking.optimizer.iterations))

    @property
    def mixed_sizes(self):
        """The training images differ in size at ``image_size``."""
        return self.train_size is None

    def _compile_inference(self):
        """Mining's single-scale embedding and evaluation's describer, of the
        current model."""
        self._embed_single = extraction.compiled_single_scale(self.model)
        self._describe = extraction.model_describer(self.model, self.config.image_size, progress=self.progress)
        if self.part is not None:
            self._embed_maps = extraction.compiled_fn(lambda maps: self.part.single_scale(maps, training=False))

    def cache_frozen_trunk(self):
        """Computes the frozen trunk's maps (`frozen_trunk.cache_run`) of
        the training images at the training scale and of every benchmark's
        images at the model's scales; training, mining, whitening and
        evaluation then run from them."""
        if self.part is None or self.caches is not None:
            return
        datasets = self.data.eval_datasets if self.chief else ()
        self.rounds.maps, failed, self.caches = cache_run(
            self.model, self.frozen, self.part, self.paths, self.sizes, self.config.image_size, datasets,
            self.progress, self.progress and self.chief)
        if len(failed):
            self.unusable |= set(failed.tolist())
            self._log(f"{len(failed)} training image(s) failed to decode and are left out of training")

    def _train_maps(self, indices):
        return self.rounds.maps[np.asarray(indices)]

    # ------------------------------------------------------------ components

    def init_whitening(self):
        """Fits the PCA-whitening layer to region descriptors of training images."""
        pca = self.model.head.pca
        if pca is None:
            return
        rng = np.random.default_rng([self.config.seed, 11])
        count = min(self.config.whitening_images, len(self.paths))
        chosen = rng.choice(len(self.paths), count, replace=False)
        if self.part is not None:
            pool = extraction.compiled_fn(self.part.pool_regions)
            inputs = ((i, (self._train_maps([i])[0],)) for i in chosen if i not in self.unusable)
        else:
            pool = extraction.compiled_fn(
                lambda x: self.model.head.pool_regions(self.model.backbone(self.model.preprocess(x)), x)
            )
            inputs = pipeline.image_dataset([self.paths[i] for i in chosen], self.config.image_size)
        regions = []
        desc = "whitening: region descriptors"
        with tqdm(total=count, desc=desc, unit="img", disable=not (self.progress and self.chief)) as bar:
            for _, (image,) in inputs:
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
        if self.part is not None:
            pool = np.setdiff1d(pool, sorted(self.unusable))
            desc = np.concatenate([np.asarray(self._embed_maps(self._train_maps(pool[i:i + 64])))
                                   for i in range(0, len(pool), 64)])
            failed = np.zeros(0, np.int64)
        else:
            desc, failed = extraction.extract(
                self._embed_single, [self.paths[i] for i in pool], c.image_size,
                progress=self.progress and self.chief, desc=f"mining round {round_index}", strict=False,
                sizes=self.sizes[pool],
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
        keep = np.setdiff1d(np.arange(len(pool)), failed)
        pool, desc = pool[keep], desc[keep]
        labels = self.labels[pool]
        negatives = mining.hard_negatives(desc, labels, desc, labels, c.num_negatives)
        negatives = np.where(negatives >= 0, pool[np.maximum(negatives, 0)], -1)
        return mining.sample_triplets(self.labels, negatives, rng, queries=pool, exclude=self.unusable)

    def start_round(self, round_index):
        """Mines the triplets of mining round ``round_index`` (`callbacks.Mining`)."""
        c = self.config
        if round_index and self.model.head.rpn is not None and c.rpn_refresh_steps:
            self.rpn.steps(self.model, c.rpn_refresh_steps, f"RPN refresh at step {round_index * c.mine_every}")
        triplets = self.mine(round_index)
        if len(triplets) == 0:
            raise ValueError("mining produced no triplet: every label needs two images "
                             "and other labels must exist")
        self.rounds.start(round_index, triplets)

    def evaluate(self, step):
        """Scores every validation split (`Selection.evaluate`, from the
        cached trunk when there is one); the step's records (chief), else None."""
        if not self.data.eval_datasets or not self.chief:
            return None
        describer = (lambda name: self.caches[name]) if self.caches is not None else (lambda name: self._describe)
        return self.selection.evaluate(step, describer)

    @property
    def records(self):
        """Every evaluation of the run (`Selection.records`)."""
        return self.selection.records

    @property
    def best(self):
        """``(worst relative gain over step 0, -step)`` of model.keras (`Selection.best`)."""
        return self.selection.best

    def save_model(self, name="model.keras"):
        """Writes ``name`` (model.keras) in the output folder atomically (chief only)."""
        if not self.chief:
            return None
        return atomic_write(os.path.join(self.config.output_dir, name), self.model.save, ".keras")

    def _log(self, message):
        if self.chief:
            tqdm.write(message)

    # ------------------------------------------------------------------ run

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
        resumed = self.backup.restore_or_start(self.ranking, self.chief, self._log)
        os.makedirs(c.output_dir, exist_ok=True)
        if self.chief:
            atomic_text(os.path.join(c.output_dir, "config.json"),
                        json.dumps(dataclasses.asdict(c), indent=1, default=str))
        if not resumed and self.model.head.rpn is not None:
            self.rpn.train(self.model)
        self.cache_frozen_trunk()
        if not resumed:
            self.init_whitening()
            self.ranking.set_start_point()
            # The model before ranking training (pretrained backbone plus
            # fitted whitening), so what training buys can be measured.
            self.save_model(INITIAL_MODEL)
            self.evaluate(0)
        fit_callbacks = [callbacks.Mining(self), self.backup, callbacks.Evaluation(self),
                         callbacks.Progress(c.steps, self.step, self.micro_steps, self.progress and self.chief)]
        if self.chief:
            fit_callbacks.append(keras.callbacks.TensorBoard(os.path.join(c.output_dir, "tensorboard"),
                                                             update_freq=self.micro_steps))
        if self.step < c.steps:
            # Mined before fit starts: input pipelines may open before the
            # first epoch begins.
            self.start_round(self.step // c.mine_every)
        try:
            self.ranking.fit(self.rounds.dataset(self.strategy), epochs=c.steps // c.mine_every,
                             callbacks=fit_callbacks, shuffle=False, verbose=0)
        except tf.errors.InvalidArgumentError as e:
            raise self._unreadable(e) from e
        if self.rpn_after:
            self.attach_rpn()
        elif self.model.head.rpn is not None and c.rpn_refresh_steps:
            self.rpn.steps(self.model, c.rpn_refresh_steps, "RPN refresh (final)")
        if self.data.eval_datasets:
            self.evaluate(self.step)
            return os.path.join(c.output_dir, "model.keras") if self.chief else None
        return self.save_model()

    def attach_rpn(self):
        """The paper order's second stage (`RPNStage.attach`): the model
        pools the proposals of an RPN trained on the ranked features."""
        self.model = self.rpn.attach(self.model, self.config.descriptor, self.config.image_size)
        self.part, self.caches = None, None  # the cached trunk served the grid model
        self._compile_inference()
        self._log("ranking with the rigid grid done: training the RPN on its features")
        self.rpn.train(self.model)

    def _unreadable(self, error):
        """The error for a training image that no longer decodes (mining
        read it at the start of the round): which files, and what to do."""
        used = self.rounds.images()
        bad = [f"{self.paths[i]}: {problem}" for i in used if (problem := diagnose(self.paths[i]))]
        if not bad:
            return error
        return ValueError(
            f"{len(bad)} training image(s) stopped decoding during the run: {'; '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. The backup in {self.backup.backup_dir} keeps the run: "
            "fix or remove the files and continue it with --resume."
        )


INITIAL_MODEL = "initial.keras"
