"""The DIR descriptor model: pixels in, L2-normalised global descriptors out.

    images [N, H, W, 3] (RGB, 0..255)
      -> backbone preprocessing
      -> for each scale: resize -> backbone -> R-MAC head (grid, RPN or pixel-grid regions, L2,
         PCA-whitening, L2, sum, L2), or GeM head (GeM, L2, fc, L2)
      -> sum over scales (or their generalised mean) -> L2
      -> [post-hoc whitening -> L2]
"""

import contextlib
import dataclasses

import keras
import numpy as np

from deep_retrieval.backbones import registry
from deep_retrieval.config import DescriptorConfig
from deep_retrieval.layers import RMAC, GeM, ImagePreprocessing, L2Normalization, MultiResolution, PCAWhitening
from deep_retrieval.model import batch_norm_folding
from deep_retrieval.ops import boxes as boxes_lib
from deep_retrieval.ops import functional, regions

__all__ = ["DescriptorConfig", "DescriptorModel", "build_descriptor_model"]


@contextlib.contextmanager
def _policy(name):
    """Layers built inside take the dtype policy ``name``."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="deep_retrieval")
class DescriptorModel(keras.Model):
    """Multi-resolution R-MAC descriptor model (see the module docstring).

    Args:
        config: the `DescriptorConfig` (default: its defaults).
        image_size: the longest image side (pixels) the model was trained
            for and describes images at, saved with it as part of its input
            contract (as KerasHub's image converters carry theirs); scales
            are relative to it. ``None`` when unknown.

    Call arguments:
        images: float32 ``[N, H, W, 3]`` RGB pixels in ``[0, 255]``, any
            ``H, W`` such that every scaled image covers at least one
            feature cell; the model resizes them to each scale. Or a list
            with one such batch per scale, each resized from the original
            image (`deep_retrieval.data.images.scale_views`), which is
            what extraction, evaluation and the serving graph pass: DIR
            resizes every scale from the original.
        training: passed to the backbone (batch-norm mode).

    Attributes:
        backbone: the convolutional trunk (a Keras model).
        head: the `RMAC` or `GeM` layer.
        network: backbone followed by head (one scale).
        post_whitening: the `PCAWhitening` after the scales are combined,
            or None.
    """

    def __init__(self, config=None, image_size=None, **kwargs):
        super().__init__(**kwargs)
        self.image_size = None if image_size is None else int(image_size)
        self.config = config or DescriptorConfig()
        c = self.config
        with _policy("mixed_bfloat16" if c.dtype == "bfloat16" else keras.config.dtype_policy().name):
            trunk, self.spec = registry.build_backbone(c.backbone, c.weights)
            self.backbone = batch_norm_folding.folded_structure(trunk) if c.fold_batch_norm else trunk
        self.preprocess = ImagePreprocessing(self.spec.preprocessing, name="preprocessing")
        rpn = None
        if c.regions == "rpn":
            rpn = dict(
                num_proposals=c.proposals,
                pre_nms_proposals=c.pre_nms_proposals,
                nms_threshold=c.nms_threshold,
                anchor_scales=c.anchor_scales,
                anchor_ratios=c.anchor_ratios,
                channels=c.rpn_channels,
            )
        if c.pooling in ("gem", "mac"):
            self.head = GeM(c.gem_p, c.normalize_pooled, c.fc_dim, mac=c.pooling == "mac", name="gem")
        else:
            self.head = RMAC(
                levels=c.levels,
                include_global=c.include_global,
                whitening=c.whitening_dim,
                regions=c.regions,
                rpn=rpn,
                whitening_bias=c.whitening_bias,
                stride=self.spec.stride,
                name="rmac",
            )
        if c.regions == "pixel_grid":
            # The head reads the image's size as well as the backbone's map.
            images = keras.Input((None, None, 3))
            self.network = keras.Model(images, self.head(self.backbone(images), images), name="network")
        else:
            self.network = keras.Sequential(
                [keras.Input((None, None, 3)), self.backbone, self.head], name="network"
            )
        self.multi_resolution = MultiResolution(
            self.network, self.config.scales, c.multiscale_power, c.multiscale_epsilon, name="multi_resolution"
        )
        self.post_whitening = None
        if c.post_whitening_dim is not None:
            self.post_whitening = PCAWhitening(c.post_whitening_dim, name="post_whitening")
            self.post_whitening.build((None, self.network.compute_output_shape((None, None, None, 3))[-1]))
            self.post_normalize = L2Normalization(name="post_l2_normalization")

    @property
    def descriptor_size(self):
        c = self.config
        return c.post_whitening_dim or c.fc_dim or c.whitening_dim or self.spec.channels

    @property
    def min_image_size(self):
        """Smallest side (pixels) for which every scale covers the stride."""
        side = self.spec.stride
        while min(functional.scaled_size(side, side, s)[0] for s in self.config.scales) < self.spec.stride:
            side += 1
        return side

    def build(self, input_shape):
        self.built = True

    def _check_input(self, images, smallest=None):
        shape = tuple(images.shape)
        dtype = keras.backend.standardize_dtype(images.dtype)
        if len(shape) != 4:
            raise ValueError(
                f"Expected a batch of images of shape [N, H, W, 3], got shape {shape}."
            )
        if shape[-1] is not None and shape[-1] != 3:
            raise ValueError(
                f"Expected 3 RGB channels, got {shape[-1]} (input shape {shape}); "
                "convert grayscale or RGBA images to RGB first."
            )
        if "float" not in dtype:
            raise ValueError(
                f"Expected float32 pixels in [0, 255], got dtype {dtype}; cast the "
                "images to float32 first (no rescaling: the model preprocesses)."
            )
        height, width = shape[1], shape[2]
        if functional.is_static_size(height, width) and min(height, width) < (smallest or self.min_image_size):
            if smallest:
                raise ValueError(
                    f"Image of {height}x{width} pixels is too small: the {self.config.backbone} "
                    f"backbone has a total stride of {self.spec.stride}; both sides must be at "
                    f"least {smallest} pixels at every scale."
                )
            raise ValueError(
                f"Image of {height}x{width} pixels is too small: the {self.config.backbone} "
                f"backbone has a total stride of {self.spec.stride}, so with scales "
                f"{self.config.scales} both sides must be at least {self.min_image_size} pixels."
            )

    def call(self, images, training=None):
        if isinstance(images, (list, tuple)):
            for view in images:
                self._check_input(view, smallest=self.spec.stride)
            views = [self.preprocess(view) for view in images]
            return self._whiten(self.multi_resolution(views, training=training))
        self._check_input(images)
        return self._whiten(self.multi_resolution(self.preprocess(images), training=training))

    def single_scale(self, images, training=None):
        """The descriptor at the input's own scale (what ranking training uses)."""
        self._check_input(images)
        return self._whiten(self.network(self.preprocess(images), training=training))

    def _whiten(self, descriptors):
        if self.post_whitening is None:
            return descriptors
        return self.post_normalize(self.post_whitening(descriptors))

    def pooled_regions(self, images):
        """The regions R-MAC pools at the input's own scale, in input pixels.

        Eager only. Returns `regions_of_map` of the images' feature maps.
        """
        if self.config.pooling != "rmac":
            raise ValueError(f"a {self.config.pooling} model pools the whole map: it has no regions")
        self._check_input(images)
        return self.regions_of_map(self.backbone(self.preprocess(images)), images.shape[1:3])

    def regions_of_map(self, fmap, image_size, grid=False):
        """The regions pooled on backbone feature maps, in image pixels.

        Each region is the block of feature cells it covers, mapped to pixels
        by the ratio of image size to feature-map size.

        Args:
            fmap: ``[N, H, W, C]`` backbone output.
            image_size: ``(height, width)`` of the images it came from.
            grid: the rigid grid's regions even when ``regions="rpn"``.

        Returns:
            A list with one float ``[R, 4]`` numpy array ``(x0, y0, x1, y1)``
            per image: the grid's regions, or the RPN's valid proposals by
            decreasing objectness (the global region first when included).
        """
        _, height, width, _ = fmap.shape
        if self.config.regions == "pixel_grid":
            cells, valid = regions.pixel_grid_cells(*image_size, height, width, self.config.levels, self.spec.stride)
            cells = np.asarray(cells)[np.asarray(valid)]
            return [boxes_lib.cells_to_pixels(cells, (height, width), image_size)] * fmap.shape[0]
        if self.head.rpn is None or grid:
            cells = regions.rmac_regions(height, width, self.config.levels, self.config.include_global)
            cells = np.concatenate([cells[:, :2], cells[:, :2] + cells[:, 2:]], axis=1)
            return [boxes_lib.cells_to_pixels(cells, (height, width), image_size)] * fmap.shape[0]
        boxes, _, valid = self.head.rpn(fmap)
        cells = np.stack([np.asarray(c) for c in boxes_lib.cell_ranges(boxes, height, width)], axis=-1)
        out = []
        for c, v in zip(cells, np.asarray(valid)):
            c = c[v]
            if self.config.include_global:
                c = np.concatenate([[[0, 0, width, height]], c])
            out.append(boxes_lib.cells_to_pixels(c, (height, width), image_size))
        return out

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.descriptor_size)

    def get_config(self):
        config = dataclasses.asdict(self.config)
        for key in ("scales", "anchor_scales", "anchor_ratios"):
            config[key] = list(config[key])
        config.update(name=self.name, trainable=self.trainable, image_size=self.image_size)
        return config

    @classmethod
    def from_config(cls, config):
        # The config's fields are saved flat (as before the model took a
        # `DescriptorConfig`); a saved model carries its weights, so backbone
        # weights are never re-fetched.
        config = dict(config)
        fields = {f.name: config.pop(f.name) for f in dataclasses.fields(DescriptorConfig) if f.name in config}
        return cls(DescriptorConfig(**{**fields, "weights": None}), **config)


def build_descriptor_model(config=None, image_size=None):
    """Builds the descriptor model described by a `DescriptorConfig`, for
    images of longest side ``image_size``."""
    config = config or DescriptorConfig()
    model = DescriptorModel(config, image_size=image_size, name="descriptor_model")
    model.build((None, None, None, 3))
    return model


def load_descriptor_model(path, image_size=None):
    """``(model, image_size)`` of a saved ``.keras`` descriptor model: the
    size given, else the one it carries (`image_size_of`); errors name the
    file."""
    try:
        model = keras.models.load_model(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot load the model: {e}") from e
    try:
        return model, image_size_of(model, image_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def for_inference(model, dtype=None):
    """``model`` as extraction runs it: its backbone in ``dtype`` (default:
    its own, `DescriptorConfig.dtype`) with the batch norms folded into the
    convolutions (`batch_norm_folding`); the same descriptors, to rounding.
    ``model`` itself when it is so already."""
    dtype = dtype or model.config.dtype
    if model.config.fold_batch_norm and dtype == model.config.dtype:
        return model
    config = dataclasses.replace(model.config, dtype=dtype, weights=None, fold_batch_norm=True)
    other = build_descriptor_model(config, model.image_size)
    if model.config.fold_batch_norm:
        other.set_weights(model.get_weights())
        return other
    batch_norm_folding.copy_folded(model.backbone, other.backbone)
    inside = {id(v) for v in model.backbone.weights}
    rest = [v for v in model.weights if id(v) not in inside]
    targets = [v for v in other.weights if id(v) not in {id(w) for w in other.backbone.weights}]
    if len(rest) != len(targets):
        raise ValueError(f"{len(rest)} weights outside the backbone, {len(targets)} in the folded model")
    for source, target in zip(rest, targets):
        target.assign(source)
    return other


def image_size_of(model, image_size=None):
    """``image_size`` when given, else the one the model carries; a
    ValueError when neither (a wrong size silently changes every
    descriptor, so none is guessed)."""
    size = image_size or model.image_size
    if not size:
        raise ValueError("the model carries no image size (saved before it recorded one); pass --image_size")
    return int(size)
