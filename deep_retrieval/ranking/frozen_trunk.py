"""The frozen trunk of ranking training, computed once per image.

With ``train_from`` the first backbone layers never change during ranking
training (frozen, their batch norms in inference mode): their output for an
image is the same at every step, mining round and evaluation. So it is
computed once: `split_backbone` cuts the backbone at the first trained
layer into two functional models that share its layers, `FeatureCache`
holds the frozen part's feature maps of a list of images at each scale, and
`TrainedPart` runs the rest of the descriptor model (the trained layers,
the head, the whitening) on them, at one scale or several. Descriptors equal
those of the whole model on the same images (`tests/test_frozen_trunk.py`),
while a training step, a mining round and an evaluation pay only for the
layers that train.

Ranking training on cached maps sees each training image as it is, without
the random crop and photometric jitter of `pipeline.augment`: the built-in
views already vary in viewpoint, crop, occlusion and light.
"""

import keras
import numpy as np
from tqdm import tqdm

from deep_retrieval.backbones.registry import freeze_backbone_before
from deep_retrieval.layers import MultiResolution
from deep_retrieval.retrieval import extraction


def split_backbone(backbone, first_trained):
    """``(frozen, trained)``: the layers of functional ``backbone`` before
    the first one named ``first_trained`` (or ``first_trained_...``) and
    from it on, as two functional models sharing ``backbone``'s layers, so
    that ``trained(frozen(x))`` is ``backbone(x)``. Freezes the first part.
    Raises ValueError when the later layers read anything but the cut."""
    index = freeze_backbone_before(backbone, first_trained)
    cut = backbone.layers[index].input
    frozen = keras.Model(backbone.input, cut, name=f"{backbone.name}_frozen")
    try:
        trained = keras.Model(cut, backbone.output, name=f"{backbone.name}_trained")
    except ValueError as e:
        raise ValueError(f"--train_from {first_trained}: the layers from it on also read earlier outputs "
                         f"(a skip connection crosses the cut); choose the first layer of a block ({e})") from None
    return frozen, trained


@keras.saving.register_keras_serializable(package="deep_retrieval")
class TrainedPart(keras.Model):
    """A descriptor model from the frozen trunk's feature maps on: the
    trained backbone layers, the head and any post-whitening, sharing the
    weights of ``model``.

    Args:
        model: the `DescriptorModel` being trained.
        trained: the later part of its backbone (`split_backbone`).

    Call arguments:
        maps: ``[N, h, w, C]`` frozen-trunk maps at one scale (what
            `single_scale` takes), or a list of them, one per scale of the
            model (the multi-resolution descriptor).
    """

    def __init__(self, model, trained, **kwargs):
        super().__init__(**kwargs)
        if model.config.regions == "pixel_grid":
            raise ValueError("regions='pixel_grid' pools the image's grid, which cached feature maps do not carry: "
                             "train without --train_from")
        self.model = model
        self.trained = trained
        self.network = keras.Sequential([trained, model.head], name="trained_network")
        c = model.config
        self.multi_resolution = MultiResolution(self.network, c.scales, c.multiscale_power, c.multiscale_epsilon,
                                                name="trained_multi_resolution")
        self.built = True

    def call(self, maps, training=None):
        return self.model._whiten(self.multi_resolution(list(maps), training=training))

    def single_scale(self, maps, training=None):
        """The descriptor at the maps' own scale (`DescriptorModel.single_scale`)."""
        return self.model._whiten(self.network(maps, training=training))

    def pool_regions(self, maps):
        """The head's region maxima (`RMAC.pool_regions`): what whitening is fitted on."""
        return self.model.head.pool_regions(self.trained(maps, training=False))


class FeatureCache:
    """The frozen trunk's feature maps of image files at each scale,
    computed once (`extraction.batches`: decoded, resized from the original
    to each scale, query boxes cropped, as extraction does).

    Args:
        model: the `DescriptorModel` (its preprocessing).
        frozen: the frozen part of its backbone (`split_backbone`).
        paths: image files.
        longest: the longest side at scale 1.
        scales: relative scales.
        boxes: optional ``[n, 4]`` crop boxes (NaN rows: none).
        sizes: optional ``[(height, width)]`` (a manifest's).
        progress, desc: the progress bar.

    Attributes:
        maps: per image, a tuple of float32 ``[h_s, w_s, C]`` arrays, one per
            scale (None for an image that did not read).
        failed: indices of images that did not read.
    """

    def __init__(self, model, frozen, paths, longest, scales=(1.0,), boxes=None, sizes=None, progress=True,
                 desc="frozen trunk"):
        fn = extraction.compiled_fn(lambda views: [frozen(model.preprocess(v), training=False) for v in views])
        self.paths, self.boxes, self.scales = list(paths), boxes, tuple(scales)
        self.maps = [None] * len(self.paths)
        with tqdm(total=len(self.paths), desc=desc, unit="img", disable=not progress) as bar:
            for indices, views in extraction.batches(self.paths, longest, boxes, self.scales, sizes=sizes):
                out = [np.asarray(m) for m in fn(views)]
                for row, i in enumerate(indices):
                    self.maps[i] = tuple(m[row] for m in out)
                bar.update(len(indices))
        self.failed = np.array([i for i, m in enumerate(self.maps) if m is None], np.int64)
        self._index = {self._key(p, None if boxes is None else boxes[i]): i for i, p in enumerate(self.paths)}

    @staticmethod
    def _key(path, box):
        box = None if box is None or np.isnan(np.asarray(box, np.float64)).any() else tuple(map(float, box))
        return path, box

    def stacked(self, indices=None):
        """``[n, h, w, C]``: the scale-1 maps of ``indices`` (default: all),
        which must share one size and have read."""
        indices = range(len(self.maps)) if indices is None else indices
        return np.stack([self.maps[i][0] for i in indices])

    def describer(self, part, batch_size=16, progress=True):
        """`extraction.evaluate_model`'s ``describe`` over the cached images:
        ``part`` (a `TrainedPart`) at every scale; images of one size run
        together, a lone image eagerly."""
        def run(maps):
            return part(list(maps), training=False)

        fn = extraction.compiled_fn(run)

        def describe(paths, boxes=None, desc="extract"):
            rows = []
            for i, path in enumerate(paths):
                key = self._key(path, None if boxes is None else boxes[i])
                if key not in self._index or self.maps[self._index[key]] is None:
                    raise ValueError(f"{path}: not among the cached images")
                rows.append(self._index[key])
            groups = {}
            for position, row in enumerate(rows):
                groups.setdefault(tuple(m.shape for m in self.maps[row]), []).append(position)
            out = None
            with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
                for positions in groups.values():
                    for start in range(0, len(positions), batch_size):
                        chunk = positions[start:start + batch_size]
                        maps = [np.stack([self.maps[rows[p]][s] for p in chunk]) for s in range(len(self.scales))]
                        # A lone query crop (each has its own size) runs eagerly:
                        # tracing a graph for its shape costs more.
                        d = np.asarray((run if len(chunk) == 1 else fn)(maps))
                        if out is None:
                            out = np.zeros((len(rows), d.shape[1]), np.float32)
                        out[chunk] = d
                        bar.update(len(chunk))
            return out

        return describe


def cache_run(model, frozen, part, paths, sizes, image_size, datasets, progress=True, bars=True):
    """The frozen trunk's maps for a run: ``(maps, failed, describers)``.

    ``maps`` ``[n, h, w, C]`` are the training images' at the training scale
    (zeros for the ``failed`` indices, which did not decode); ``describers``
    maps each benchmark's name to a describer of its images at the model's
    scales from their cached maps (one compiled function for the whole run).
    ``bars`` shows the caching's progress, ``progress`` the describers'.
    """
    train = FeatureCache(model, frozen, paths, image_size, sizes=sizes, progress=bars,
                         desc="frozen trunk: training images")
    good = np.setdiff1d(np.arange(len(paths)), train.failed)
    maps = np.zeros((len(paths),) + train.maps[good[0]][0].shape, np.float32)
    maps[good] = train.stacked(good)
    describers = {}
    for dataset in datasets:
        images = list(dataset.images) + list(dataset.queries)
        boxes = [[float("nan")] * 4] * len(dataset.images) + extraction.query_boxes(dataset)
        cache = FeatureCache(model, frozen, images, image_size, model.config.scales, boxes, progress=bars,
                             desc=f"frozen trunk: {dataset.name}")
        describers[dataset.name] = cache.describer(part, progress=progress)
    return maps, train.failed, describers
