import keras

from deep_retrieval.ops import functional


@keras.saving.register_keras_serializable(package="deep_retrieval")
class L2Normalization(keras.layers.Layer):
    """Scales vectors to unit L2 norm: ``x / (||x|| + epsilon)``.

    The epsilon is added to the norm, as in the reference DIR and cirtorch
    code, so an all-zero vector maps to zero.

    Args:
        axis: the axis holding the vector components.
        epsilon: added to the norm.

    Call arguments:
        inputs: a tensor of any rank.

    Example:
    >>> L2Normalization()(np.array([[3.0, 4.0]]))  # ~[[0.6, 0.8]]

    Reference:
        Gordo et al., "Deep Image Retrieval", ECCV 2016.
    """

    def __init__(self, axis=-1, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights to create
        self.axis = axis
        self.epsilon = epsilon

    def call(self, inputs):
        return functional.l2_normalize(inputs, axis=self.axis, epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis, "epsilon": self.epsilon})
        return config
