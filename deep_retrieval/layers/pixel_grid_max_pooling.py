import keras
from keras import ops

from deep_retrieval.ops import functional, regions


@keras.saving.register_keras_serializable(package="deep_retrieval")
class PixelGridMaxPooling(keras.layers.Layer):
    """Max-pooling over the R-MAC grid of the image, as the DIR Caffe release
    pools it.

    The release computes the grid in image pixels (its ``test.py``) and
    max-pools each region with Caffe's ROIPooling, rounding the region's
    ends to feature cells (`deep_retrieval.ops.regions.pixel_grid_cells`).
    This differs from `RegionMaxPooling`, which lays the grid on the
    feature map: the regions differ by a cell at some borders, so a
    descriptor of the released network needs this pooling to be the
    release's. An empty region (none of the release's sizes gives one)
    pools as zeros, as in Caffe.

    Args:
        levels: the grid's ``L``.
        stride: image pixels per feature cell (ROIPooling's
            ``1 / spatial_scale``).

    Call arguments:
        features: ``[N, H, W, C]`` feature map.
        images: the ``[N, h, w, ...]`` images it was computed from (only
            their size is read).

    Returns:
        ``(pooled, valid)``: ``[N, R, C]`` region maxima over a fixed set of
        candidate regions and the bool ``[R]`` mask of the real ones.

    Example:
    >>> pooling = PixelGridMaxPooling(levels=2, stride=32)
    >>> pooled, valid = pooling(np.random.rand(1, 19, 25, 8), np.zeros((1, 600, 800, 3)))

    Reference:
        Gordo et al., ``deep_retrieval`` package (``test.py``,
        ``deploy_resnet101.prototxt``); Girshick, "Fast R-CNN", ICCV 2015
        (ROI pooling).
    """

    def __init__(self, levels=2, stride=32, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights to create
        self.levels = int(levels)
        self.stride = int(stride)

    def call(self, features, images):
        _, height, width, _ = ops.shape(features)
        image_height, image_width = ops.shape(images)[1], ops.shape(images)[2]
        cells, valid = regions.pixel_grid_cells(image_height, image_width, height, width, self.levels, self.stride)
        boxes = ops.broadcast_to(ops.cast(cells, features.dtype)[None], (ops.shape(features)[0],) + tuple(cells.shape))
        pooled = functional.box_max_pool(features, boxes)
        empty = ops.logical_or(cells[:, 2] <= cells[:, 0], cells[:, 3] <= cells[:, 1])
        return ops.where(empty[None, :, None], ops.zeros_like(pooled), pooled), valid

    def compute_output_shape(self, features_shape, images_shape):
        return (features_shape[0], None, features_shape[-1]), (None,)

    def get_config(self):
        config = super().get_config()
        config.update({"levels": self.levels, "stride": self.stride})
        return config
