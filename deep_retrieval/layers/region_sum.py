import keras

from deep_retrieval.ops import functional


@keras.saving.register_keras_serializable(package="deep_retrieval")
class RegionSum(keras.layers.Layer):
    """Sums region descriptors ``[N, R, C] -> [N, C]``, counting valid ones.

    Call arguments:
        inputs: ``[N, R, C]`` region descriptors.
        valid: optional boolean mask, ``[R]`` (see `RegionMaxPooling`) or
            ``[N, R]`` (per image, see `RegionProposalNetwork`).

    Example:
    >>> RegionSum()(np.ones((2, 5, 3)))  # all 5.0

    Reference:
        Tolias, Sicre, Jégou, ICLR 2016 (R-MAC aggregation).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights to create

    def call(self, inputs, valid=None):
        return functional.sum_regions(inputs, valid)

    def compute_output_shape(self, inputs_shape, valid_shape=None):
        # Named after call()'s arguments, as Keras needs for more than one.
        return (inputs_shape[0], inputs_shape[2])
