import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deep_retrieval")
class PCAWhitening(keras.layers.Layer):
    """PCA-whitening as a shifted fully-connected layer: ``(x - mean) @ kernel``.

    DIR initialises ``mean`` and ``kernel`` by PCA of region descriptors
    (`deep_retrieval.model.whitening.fit_pca_whitening`) and then trains them with
    the rest of the network, which is why this is a layer with weights rather
    than a fixed post-processing step.

    Args:
        units: output dimension ``D``.
        trainable: whether ``mean`` and ``kernel`` are trained.

    Call arguments:
        inputs: ``[..., C]`` descriptors.

    Example:
    >>> layer = PCAWhitening(64)
    >>> layer.build((None, 128))
    >>> layer.set_pca(mean, projection)  # from fit_pca_whitening

    Reference:
        Gordo et al., "Deep Image Retrieval: Learning global representations
        for image search", ECCV 2016, Section 3.
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        channels = input_shape[-1]
        if self.units > channels:
            raise ValueError(
                f"PCAWhitening cannot map {channels} channels to {self.units} "
                "dimensions: `units` must not exceed the input size."
            )
        self.mean = self.add_weight(
            name="mean", shape=(channels,), initializer="zeros"
        )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(channels, self.units),
            initializer=keras.initializers.Identity(),
        )

    def set_pca(self, mean, projection):
        """Sets the shift ``mean [C]`` and the projection ``[C, units]``."""
        self.mean.assign(ops.convert_to_tensor(mean, self.mean.dtype))
        self.kernel.assign(ops.convert_to_tensor(projection, self.kernel.dtype))

    def call(self, inputs):
        return ops.matmul(inputs - self.mean, self.kernel)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units})
        return config
