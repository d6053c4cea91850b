"""The frozen trunk computed once: the split backbone, the cached maps, and
ranking training on them, against the whole model on the same images."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.backbones import registry
from deep_retrieval.data import pipeline
from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
from deep_retrieval.ranking.frozen_trunk import FeatureCache, TrainedPart, split_backbone
from deep_retrieval.ranking.siamese import RankingModel
from tests.helpers_images import reference_descriptors, textured


def _files(tmp_path, sizes):
    from PIL import Image

    paths = []
    for i, (h, w) in enumerate(sizes):
        path = str(tmp_path / f"im{i}.png")
        Image.fromarray(textured(h, w, seed=i)).save(path)
        paths.append(path)
    return paths


def test_split_efficientnet_at_a_block_gives_the_whole_backbone():
    backbone, _ = registry.build_backbone("efficientnet_lite0", weights=None)
    frozen, trained = split_backbone(backbone, "blocks_9")
    x = np.random.default_rng(0).uniform(0, 1, (2, 96, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(trained(frozen(x))), np.asarray(backbone(x)), atol=1e-5)
    names = [layer.name for layer in backbone.layers]
    first = names.index("blocks_9_expand_conv")
    assert not any(layer.trainable for layer in backbone.layers[1:first] if layer.weights)
    assert all(layer.trainable for layer in backbone.layers[first:] if layer.weights)
    # The trained part's weights are the backbone's own variables.
    assert {id(v) for v in trained.weights} <= {id(v) for v in backbone.weights}


def test_a_cut_crossed_by_a_skip_connection_is_refused():
    backbone, _ = registry.build_backbone("efficientnet_lite0", weights=None)
    # blocks_9_add reads the block's input, which comes before its depthwise conv.
    with pytest.raises(ValueError, match="skip connection"):
        split_backbone(backbone, "blocks_9_depthwise")


def _tiny_model():
    config = DescriptorConfig(backbone="tiny", weights=None, whitening_dim=16, scales=(0.75, 1.0, 1.25))
    model = build_descriptor_model(config, image_size=64)
    pca = model.head.pca
    rng = np.random.default_rng(1)
    pca.set_weights([rng.normal(size=w.shape).astype("float32") for w in pca.get_weights()])
    return model


def test_cached_maps_give_the_models_multi_resolution_descriptors(tmp_path):
    model = _tiny_model()
    frozen, trained = split_backbone(model.backbone, "conv3_1")
    part = TrainedPart(model, trained)
    paths = _files(tmp_path, [(72, 96), (96, 72), (72, 96)])
    boxes = [[np.nan] * 4, [np.nan] * 4, [10.0, 8.0, 70.0, 60.0]]
    cache = FeatureCache(model, frozen, paths, 64, model.config.scales, boxes, progress=False)
    describe = cache.describer(part, progress=False)
    blobs = [open(p, "rb").read() for p in paths]
    want = reference_descriptors(model, blobs, 64, boxes)
    got = np.concatenate([describe(paths[:2]), describe(paths[2:], boxes[2:])])
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="not among the cached images"):
        describe(paths[2:])  # cached only as a boxed query


def test_a_ranking_step_on_cached_maps_equals_one_on_the_images(tmp_path):
    paths = _files(tmp_path, [(48, 64)] * 4)
    triplets = np.array([[0, 1, 2], [2, 3, 0]])
    weights = None
    results = []
    for cached in (False, True):
        keras.utils.set_random_seed(0)
        model = _tiny_model()
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        for layer in model.backbone.layers:  # pretrained statistics stay frozen
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        if cached:
            frozen, trained = split_backbone(model.backbone, "conv3_1")
            maps = FeatureCache(model, frozen, paths, 64, progress=False).stacked()
            data = pipeline.map_triplet_dataset(maps, triplets, 2, seed=5)
            ranking = RankingModel(TrainedPart(model, trained), 0.1, 2)
        else:
            registry.freeze_backbone_before(model.backbone, "conv3_1")
            data = pipeline.triplet_dataset(paths, triplets, 64, 2, seed=5, augment_images=False, size=(48, 64))
            data = data.map(lambda x: tf.stack([x[k] for k in ("query", "positive", "negative")], 1))
            ranking = RankingModel(model, 0.1, 2)
        ranking.compile(optimizer=keras.optimizers.SGD(0.5))
        history = ranking.fit(data, epochs=1, shuffle=False, verbose=0)
        results.append((history.history["loss"][0], model.get_weights()))
    (loss_a, after_a), (loss_b, after_b) = results
    assert loss_a > 0 and abs(loss_a - loss_b) < 1e-5
    assert any(not np.allclose(a, w) for a, w in zip(after_a, weights))  # the step changed something
    for a, b in zip(after_a, after_b):
        np.testing.assert_allclose(a, b, atol=1e-5)
