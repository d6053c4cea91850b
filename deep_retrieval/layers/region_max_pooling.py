import keras
from keras import ops

from deep_retrieval.ops import functional, regions


@keras.saving.register_keras_serializable(package="deep_retrieval")
class RegionMaxPooling(keras.layers.Layer):
    """Exact max-pooling over the regions of the R-MAC grid.

    When the feature-map size is known at trace time (eager calls, JAX, a
    `tf.function` traced for one size) the grid of
    `deep_retrieval.ops.regions.rmac_regions` is pooled directly. When it is only
    known at run time (a graph with ``None`` spatial dimensions, as in an
    exported serving signature) a fixed set of candidate windows is pooled
    and a mask says which are real, so one graph serves every size.

    Args:
        levels: number of grid scales ``L``.
        include_global: also pool the whole map, as the first region.

    Call arguments:
        inputs: ``[N, H, W, C]`` feature map.

    Returns:
        ``(pooled, valid)``: ``pooled`` ``[N, R, C]`` region maxima and
        ``valid`` a boolean ``[R]`` mask of the real regions (all True when
        the size is static).

    Example:
    >>> pooled, valid = RegionMaxPooling(levels=3)(np.zeros((1, 24, 32, 8)))
    >>> pooled.shape  # (1, 20, 8)

    Reference:
        Tolias, Sicre, Jégou, "Particular object retrieval with integral
        max-pooling of CNN activations", ICLR 2016.
    """

    def __init__(self, levels=3, include_global=False, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights to create
        self.levels = levels
        self.include_global = include_global

    def call(self, inputs):
        pooled, valid = functional.grid_max_pool(inputs, self.levels, self.include_global)
        if valid is None:
            valid = ops.ones((ops.shape(pooled)[1],), dtype="bool")
        return pooled, valid

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        if height is None or width is None:
            return (batch, None, channels), (None,)
        count = len(
            regions.rmac_regions(height, width, self.levels, self.include_global)
        )
        return (batch, count, channels), (count,)

    def get_config(self):
        config = super().get_config()
        config.update({"levels": self.levels, "include_global": self.include_global})
        return config
