import keras

from deep_retrieval.config import PAPER_SCALES
from deep_retrieval.ops import functional


def _one_shape(shape):
    """The shape of one scale's batch, given one shape or one per scale."""
    return shape[0] if shape and isinstance(shape[0], (list, tuple)) else shape


def _signed_power(x, p, epsilon):
    return keras.ops.sign(x) * keras.ops.power(keras.ops.maximum(keras.ops.abs(x), epsilon), p)


@keras.saving.register_keras_serializable(package="deep_retrieval")
class MultiResolution(keras.layers.Wrapper):
    """Runs a descriptor network at several image scales and sums the results.

    Each scale resizes the input images (bilinear, half-pixel centres), applies
    the wrapped layer, and the per-scale (already L2-normalised) descriptors
    are summed and L2-normalised again (DIR). With ``power`` p other than 1
    they are combined as a generalised mean instead,
    ``L2(g(mean_s g(v_s, p), 1/p))`` with ``g(v, p) = sign(v) max(|v|, eps)^p``:
    cirtorch's rule for GeM models (p = GeM's power, eps = 0) and dirtorch's
    (p = 3, eps = 1e-6, which also lifts small means before the root).

    Given a list of images instead, one per scale, each already resized from
    the original (`deep_retrieval.data.images.scale_views`, as DIR does),
    the layer applies the wrapped layer to each as it is: resizing an
    already-resized image blurs the upsampled scales.

    Args:
        layer: a layer or model mapping ``[N, H, W, 3]`` images to ``[N, D]``
            descriptors.
        scales: relative image scales; ``1.0`` keeps the input as it is.
        power: the power of the combination (1: the sum).
        epsilon: the clamp ``eps`` of the generalised mean.

    Call arguments:
        inputs: ``[N, H, W, 3]`` images (after preprocessing), or a list of
            ``len(scales)`` such batches, the images at each scale.
        training: passed to the wrapped layer.

    Example:
    >>> net = keras.Sequential([backbone, RMAC()])
    >>> MultiResolution(net, scales=(1.0, 2 ** -0.5, 2 ** 0.5))(images)

    Reference:
        Gordo et al., "End-to-end learning of deep visual representations for
        image retrieval", IJCV 2017, Section 5 (multi-resolution).
    """

    def __init__(self, layer, scales=PAPER_SCALES, power=1.0, epsilon=0.0, **kwargs):
        super().__init__(layer, **kwargs)
        self.power, self.epsilon = float(power), float(epsilon)
        scales = tuple(float(s) for s in scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"`scales` must be positive numbers, got {scales}.")
        self.scales = scales
        self.built = layer.built  # nothing of its own to create

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(_one_shape(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(self.scales):
                raise ValueError(f"Expected {len(self.scales)} images, one per scale "
                                 f"{self.scales}, got {len(inputs)}.")
            views = inputs
        else:
            _, height, width, _ = keras.ops.shape(inputs)
            views = [
                inputs if s == 1 else functional.resize_bilinear(inputs, *functional.scaled_size(height, width, s))
                for s in self.scales
            ]
        total = None
        for x in views:
            d = self.layer(x, training=training)
            if self.power != 1:
                d = _signed_power(d, self.power, self.epsilon)
            total = d if total is None else total + d
        if self.power != 1:
            total = _signed_power(total / len(views), 1.0 / self.power, self.epsilon)
        return functional.l2_normalize(total)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(_one_shape(input_shape))

    def get_config(self):
        config = super().get_config()
        config.update({"scales": list(self.scales), "power": self.power, "epsilon": self.epsilon})
        return config
