"""The input of ranking training: the triplets of the current mining round
as the tf.data pipeline that ``fit`` reads (TensorFlow only).

One ``fit`` epoch is one round. `callbacks.Mining` mines at the start of
each (`TripletRounds.start`); the pipeline, which ``fit`` iterates afresh
every epoch, then reads that round's triplets (`TripletRounds.dataset`) and
`TripletRounds.check` makes sure it did.
"""

import numpy as np
import tensorflow as tf

from deep_retrieval.data import pipeline
from deep_retrieval.ranking.siamese import STREAMS


class TripletRounds:
    """The current round's triplets and the input pipeline over them.

    Args:
        paths: image path of each training index.
        image_size: longest side of the training images.
        batch_size: triplets per optimizer step, over all replicas.
        micro_steps: ``fit`` steps per optimizer step (gradient
            accumulation): each reads ``batch_size / micro_steps`` triplets.
        steps_per_round: optimizer steps per round (``mine_every``).
        seed: the run's seed; a round's order and augmentation follow from
            it and the round's index.
        size: ``(height, width)`` of every training image at
            ``image_size`` (one aspect ratio), or None (mixed sizes: one
            triplet a step, each image at its own size).
    """

    def __init__(self, paths, image_size, batch_size, micro_steps, steps_per_round, seed, size):
        self.paths, self.image_size, self.batch_size = paths, image_size, batch_size
        self.micro_steps, self.steps_per_round, self.seed, self.size = micro_steps, steps_per_round, seed, size
        self.maps = None  # [n, h, w, C] frozen-trunk maps to train on instead of the images (`frozen_trunk`)
        self.index = None  # the current round
        self._triplets = None
        self._served = []  # the round each pass of the pipeline read

    def start(self, round_index, triplets):
        """Makes ``triplets`` (``[m, 3]`` indices) those the pipeline reads."""
        self._triplets = np.asarray(triplets, np.int64)
        self.index = round_index

    def images(self):
        """The indices of the images the current round uses."""
        return [] if self._triplets is None else sorted({int(i) for i in np.unique(self._triplets) if i >= 0})

    def _serve(self):
        self._served.append(self.index)
        return self._triplets, np.int64(self.seed * 100003 + self.index)

    def check(self, round_index):
        """Raises if the input read during round ``round_index`` was not
        that round's triplets (a pipeline that ran ahead of mining)."""
        if self._served[-1:] != [round_index]:
            raise RuntimeError(f"mining round {round_index} trained on the triplets of rounds {self._served}")

    def dataset(self, strategy=None):
        """``fit``'s input: each pass, the current round's ``steps_per_round``
        optimizer steps of batches, ``[B, 3, H, W, 3]`` (one size) or dicts
        of the three streams (mixed sizes). Distributed by ``strategy``
        (`tf.distribute`) when given."""
        count = self.steps_per_round * self.micro_steps

        def dataset_fn(context):
            shard, batch = None, self.batch_size
            if context is not None:
                batch = context.get_per_replica_batch_size(self.batch_size)
                if context.num_input_pipelines > 1:
                    shard = (context.num_input_pipelines, context.input_pipeline_id)

            def one_round(_):
                triplets, seed = tf.py_function(self._serve, [], (tf.int64, tf.int64))
                if self.maps is not None:
                    return pipeline.map_triplet_dataset(
                        self.maps, tf.ensure_shape(triplets, [None, 3]), batch // self.micro_steps,
                        tf.ensure_shape(seed, []), shard=shard, repeat=True)
                return pipeline.triplet_dataset(
                    self.paths, tf.ensure_shape(triplets, [None, 3]), self.image_size, batch // self.micro_steps,
                    tf.ensure_shape(seed, []), shard=shard, repeat=True, size=self.size,
                )

            ds = tf.data.Dataset.from_tensors(0).flat_map(one_round).take(count)
            if self.size is not None and self.maps is None:
                # One size: the streams stacked in one tensor (a dict input
                # cannot pass Keras's first-batch check under tf.distribute).
                ds = ds.map(lambda x: tf.stack([x[k] for k in STREAMS], axis=1))
            return ds.apply(tf.data.experimental.assert_cardinality(count))

        if strategy is not None:
            return strategy.distribute_datasets_from_function(dataset_fn)
        return dataset_fn(None)
