import keras
from keras import ops

from deep_retrieval.layers.box_max_pooling import BoxMaxPooling
from deep_retrieval.layers.l2_normalization import L2Normalization
from deep_retrieval.layers.pca_whitening import PCAWhitening
from deep_retrieval.layers.pixel_grid_max_pooling import PixelGridMaxPooling
from deep_retrieval.layers.region_max_pooling import RegionMaxPooling
from deep_retrieval.layers.region_proposal_network import RegionProposalNetwork
from deep_retrieval.layers.region_sum import RegionSum
from deep_retrieval.ops import functional


@keras.saving.register_keras_serializable(package="deep_retrieval")
class RMAC(keras.layers.Layer):
    """The R-MAC head of Deep Image Retrieval.

    ``L2(sum over regions of L2(whiten(L2(max over region))))``: exact region
    max-pooling on the R-MAC grid (or on the proposals of a region proposal
    network, ``regions="rpn"``, or on the grid of the image in pixels as the
    DIR Caffe release pools it, ``regions="pixel_grid"``), per-region L2, PCA-whitening as a shifted
    fully-connected layer followed by L2 (skipped when ``whitening`` is None),
    sum over regions, and a final L2. Computes in float32 whatever the global
    dtype policy, so it is safe under mixed precision.

    Args:
        levels: grid scales ``L`` (``regions="grid"``).
        include_global: also pool the whole map as a region.
        regions: ``"grid"`` (the rigid R-MAC grid), ``"rpn"`` (proposals of
            a `RegionProposalNetwork`, which this layer then holds as
            ``rpn``) or ``"pixel_grid"`` (`PixelGridMaxPooling`).
        rpn: keyword arguments of the `RegionProposalNetwork` (``regions="rpn"``).
        whitening: output size of the PCA-whitening layer, or None for none.
        whitening_bias: the whitening has a bias after its projection
            (`PCAWhitening`'s ``use_bias``).
        stride: image pixels per feature cell (``regions="pixel_grid"``).
        epsilon: added to every norm.

    Call arguments:
        inputs: ``[N, H, W, C]`` feature map of any spatial size.
        images: the images the map was computed from, whose size
            ``regions="pixel_grid"`` needs (ignored otherwise).

    Example:
    >>> head = RMAC(levels=3, whitening=None)
    >>> head(np.random.rand(2, 24, 32, 2048).astype("float32")).shape
    (2, 2048)

    Reference:
        Gordo, Almazán, Revaud, Larlus, "Deep Image Retrieval: Learning global
        representations for image search", ECCV 2016; Tolias, Sicre, Jégou,
        ICLR 2016.
    """

    def __init__(
        self,
        levels=3,
        include_global=False,
        whitening=None,
        epsilon=1e-6,
        regions="grid",
        rpn=None,
        whitening_bias=False,
        stride=32,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if regions not in ("grid", "rpn", "pixel_grid"):
            raise ValueError(f"`regions` must be 'grid', 'rpn' or 'pixel_grid', got {regions!r}.")
        self.levels = levels
        self.include_global = include_global
        self.regions = regions
        self.rpn_config = dict(rpn or {})
        self.whitening = None if whitening is None else int(whitening)
        self.whitening_bias = bool(whitening_bias)
        self.stride = int(stride)
        self.epsilon = epsilon
        self.rpn = None
        if regions == "rpn":
            self.rpn = RegionProposalNetwork(
                **self.rpn_config, dtype=self.dtype_policy, name="rpn"
            )
            self.pooling = BoxMaxPooling(dtype=self.dtype_policy, name="box_max_pooling")
        elif regions == "pixel_grid":
            self.pooling = PixelGridMaxPooling(levels, self.stride, dtype=self.dtype_policy,
                                               name="pixel_grid_max_pooling")
        else:
            self.pooling = RegionMaxPooling(
                levels, include_global, dtype=self.dtype_policy, name="region_max_pooling"
            )
        self.normalize = L2Normalization(
            epsilon=epsilon, dtype=self.dtype_policy, name="l2_normalization"
        )
        self.pca = (
            None
            if whitening is None
            else PCAWhitening(self.whitening, self.whitening_bias, dtype=self.dtype_policy, name="pca_whitening")
        )
        self.region_sum = RegionSum(dtype=self.dtype_policy, name="region_sum")

    def build(self, input_shape):
        if self.rpn is not None:
            self.rpn.build(input_shape)
        if self.pca is not None:
            self.pca.build((None, input_shape[-1]))

    def pool_regions(self, inputs, images=None):
        """``(pooled [N, R, C], valid)``: the region maxima before any
        normalisation, and a ``[R]`` or ``[N, R]`` mask of the real regions
        (what PCA-whitening is fitted on)."""
        if self.regions == "pixel_grid":
            if images is None:
                raise ValueError("regions='pixel_grid' pools the image's grid: pass the images too")
            return self.pooling(inputs, images)
        if self.rpn is None:
            return self.pooling(inputs)
        boxes, _, valid = self.rpn(inputs)
        pooled = self.pooling(inputs, boxes)
        if self.include_global:
            pooled = ops.concatenate([ops.max(inputs, axis=(1, 2))[:, None, :], pooled], axis=1)
            valid = ops.concatenate([ops.ones_like(valid[:, :1]), valid], axis=1)
        return pooled, valid

    def call(self, inputs, images=None):
        pooled, valid = self.pool_regions(inputs, images)
        x = self.normalize(functional.mask_invalid_regions(pooled, valid))
        if self.pca is not None:
            x = self.normalize(self.pca(x))
        return self.normalize(self.region_sum(x, valid))

    def compute_output_shape(self, inputs_shape, images_shape=None):
        return (inputs_shape[0], self.whitening or inputs_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "levels": self.levels,
                "include_global": self.include_global,
                "whitening": self.whitening,
                "epsilon": self.epsilon,
                "regions": self.regions,
                "rpn": self.rpn_config or None,
                "whitening_bias": self.whitening_bias,
                "stride": self.stride,
            }
        )
        return config
