import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deep_retrieval")
class GeMPooling(keras.layers.Layer):
    """Generalised-mean pooling with a learnable power ``p``:
    ``(mean over H, W of max(x, eps)^p)^(1/p)``.

    ``p = 1`` is average pooling and ``p -> inf`` max pooling; the clamp keeps
    the power defined for the zeros a ReLU leaves. Computes in float32.

    Args:
        p: the initial power (3 in cirtorch and dirtorch).
        epsilon: the clamp (1e-6 in both).

    Call arguments:
        inputs: ``[N, H, W, C]`` feature maps of any spatial size.

    Returns ``[N, C]``.

    Example:
    >>> GeMPooling(p=3.0)(np.ones((2, 7, 9, 16), "float32")).shape
    (2, 16)

    Reference:
        Radenović, Tolias, Chum, "Fine-tuning CNN image retrieval with no
        human annotation", TPAMI 2018.
    """

    def __init__(self, p=3.0, epsilon=1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.initial_p = float(p)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.p = self.add_weight(name="p", shape=(), initializer=keras.initializers.Constant(self.initial_p))

    def call(self, inputs):
        x = ops.power(ops.maximum(ops.cast(inputs, "float32"), self.epsilon), self.p)
        return ops.power(ops.mean(x, axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.initial_p, "epsilon": self.epsilon})
        return config
