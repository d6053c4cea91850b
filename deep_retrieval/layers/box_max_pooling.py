import keras

from deep_retrieval.ops import functional


@keras.saving.register_keras_serializable(package="deep_retrieval")
class BoxMaxPooling(keras.layers.Layer):
    """Exact max-pooling of a feature map over a list of boxes per image.

    The counterpart of `RegionMaxPooling` for regions that are not the rigid
    grid (proposals of a `RegionProposalNetwork`): each box pools the cells it
    covers (`deep_retrieval.rpn.cell_ranges`), so given the grid's own
    windows it returns exactly the grid pooling.

    Call arguments:
        features: ``[N, H, W, C]`` feature map.
        boxes: ``[N, K, 4]`` boxes ``(x0, y0, x1, y1)`` in cell units.

    Returns:
        ``[N, K, C]`` region maxima.

    Example:
    >>> boxes = np.array([[[0, 0, 14, 10], [2, 1, 9, 8]]], "float32")
    >>> BoxMaxPooling()(np.random.rand(1, 10, 14, 8), boxes).shape
    (1, 2, 8)

    Reference:
        Gordo et al., "End-to-end learning of deep visual representations for
        image retrieval", IJCV 2017, Section 3.3.
    """

    def call(self, features, boxes):
        return functional.box_max_pool(features, boxes)

    def compute_output_shape(self, features_shape, boxes_shape):
        return (features_shape[0], boxes_shape[1], features_shape[-1])
