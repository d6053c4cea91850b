import keras

from deep_retrieval import functional

PAPER_SCALES = (550 / 800, 1.0, 1050 / 800)
"""DIR's multi-resolution setting: images at 550, 800 and 1050 px for a model
trained at 800 px, as scales relative to the input."""


@keras.saving.register_keras_serializable(package="deep_retrieval")
class MultiResolution(keras.layers.Wrapper):
    """Runs a descriptor network at several image scales and sums the results.

    Each scale resizes the input images (bilinear, half-pixel centres), applies
    the wrapped layer, and the per-scale (already L2-normalised) descriptors
    are summed and L2-normalised again.

    Args:
        layer: a layer or model mapping ``[N, H, W, 3]`` images to ``[N, D]``
            descriptors.
        scales: relative image scales; ``1.0`` keeps the input as it is.

    Call arguments:
        inputs: ``[N, H, W, 3]`` images (after preprocessing).
        training: passed to the wrapped layer.

    Example:
    >>> net = keras.Sequential([backbone, RMAC()])
    >>> MultiResolution(net, scales=(1.0, 2 ** -0.5, 2 ** 0.5))(images)

    Reference:
        Gordo et al., "End-to-end learning of deep visual representations for
        image retrieval", IJCV 2017, Section 5 (multi-resolution).
    """

    def __init__(self, layer, scales=PAPER_SCALES, **kwargs):
        super().__init__(layer, **kwargs)
        scales = tuple(float(s) for s in scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"`scales` must be positive numbers, got {scales}.")
        self.scales = scales

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        _, height, width, _ = keras.ops.shape(inputs)
        total = None
        for scale in self.scales:
            size = functional.scaled_size(height, width, scale)
            x = inputs if scale == 1 else functional.resize_bilinear(inputs, *size)
            d = self.layer(x, training=training)
            total = d if total is None else total + d
        return functional.l2_normalize(total)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"scales": list(self.scales)})
        return config
