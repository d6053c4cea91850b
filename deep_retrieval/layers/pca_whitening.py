import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deep_retrieval")
class PCAWhitening(keras.layers.Layer):
    """PCA-whitening as a shifted fully-connected layer: ``(x - mean) @ kernel``
    (``+ bias`` with ``use_bias``).

    DIR initialises ``mean`` and ``kernel`` by PCA of region descriptors
    (`deep_retrieval.model.whitening.fit_pca_whitening`) and then trains them with
    the rest of the network, which is why this is a layer with weights rather
    than a fixed post-processing step.

    Args:
        units: output dimension ``D``.
        use_bias: add a bias after the projection: the form of the DIR Caffe
            release, whose shift is a Scale layer (``w * x + b``) followed by
            an InnerProduct with its own bias (imported as ``mean`` 0,
            ``kernel`` ``diag(w) W^T`` and ``bias`` ``b W^T + c``).
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

    def __init__(self, units, use_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)

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
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros") if self.use_bias else None

    def set_pca(self, mean, projection, bias=None):
        """Sets the shift ``mean [C]``, the projection ``[C, units]`` and,
        with ``use_bias``, the ``bias [units]``."""
        if (bias is not None) != self.use_bias:
            raise ValueError(f"this PCAWhitening {'has' if self.use_bias else 'has no'} bias")
        self.mean.assign(ops.convert_to_tensor(mean, self.mean.dtype))
        self.kernel.assign(ops.convert_to_tensor(projection, self.kernel.dtype))
        if bias is not None:
            self.bias.assign(ops.convert_to_tensor(bias, self.bias.dtype))

    def call(self, inputs):
        out = ops.matmul(inputs - self.mean, self.kernel)
        return out if self.bias is None else out + self.bias

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "use_bias": self.use_bias})
        return config
