import keras
import numpy as np
import pytest

from deep_retrieval.config import DescriptorConfig, TrainConfig
from deep_retrieval.model import batch_norm_folding
from deep_retrieval.model.descriptor_model import build_descriptor_model, for_inference


def _conv(x, kernel, bias):
    """numpy 'valid' convolution, stride 1: ``[H, W, in] -> [H', W', out]``."""
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))  # [H', W', in, kh, kw]
    return np.einsum("yxcij,ijco->yxo", windows, kernel) + bias


def _depthwise(x, kernel):
    kh, kw, channels, multiplier = kernel.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
    return np.einsum("yxcij,ijcm->yxcm", windows, kernel).reshape(*windows.shape[:2], channels * multiplier)


def _norm(x, gamma, beta, mean, variance, epsilon):
    return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta


def test_fold_equals_convolution_then_batch_norm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6, 3))
    kernel, bias = rng.normal(size=(3, 3, 3, 5)), rng.normal(size=5)
    gamma, beta, mean = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    variance = rng.uniform(0.1, 3, 5)
    expected = _norm(_conv(x, kernel, bias), gamma, beta, mean, variance, 1e-3)
    k, b = batch_norm_folding.fold(kernel, bias, gamma, beta, mean, variance, 1e-3)
    np.testing.assert_allclose(_conv(x, k, b), expected, rtol=1e-5, atol=1e-5)
    # no conv bias, no scale, no center
    expected = _norm(_conv(x, kernel, 0), 1, 0, mean, variance, 1e-3)
    k, b = batch_norm_folding.fold(kernel, None, None, None, mean, variance, 1e-3)
    np.testing.assert_allclose(_conv(x, k, b), expected, rtol=1e-5, atol=1e-5)


def test_fold_depthwise_channels_in_keras_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5, 3))
    kernel = rng.normal(size=(3, 3, 3, 2))  # output channel c * 2 + m
    gamma, beta, mean = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    variance = rng.uniform(0.1, 3, 6)
    expected = _norm(_depthwise(x, kernel), gamma, beta, mean, variance, 1e-5)
    k, b = batch_norm_folding.fold(kernel, None, gamma, beta, mean, variance, 1e-5, depthwise=True)
    np.testing.assert_allclose(_depthwise(x, k) + b, expected, rtol=1e-5, atol=1e-5)
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
    layer.build((None, 6, 5, 3))
    layer.set_weights([kernel.astype("float32")])  # the layout fold assumes is Keras's
    np.testing.assert_allclose(np.asarray(layer(x[None].astype("float32")))[0], _depthwise(x, kernel),
                               rtol=1e-4, atol=1e-4)


def _randomize_statistics(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 2.0, w.shape).astype("float32") if "variance" in w.path
                               else rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.weights])


def test_folded_model_computes_the_same():
    inputs = keras.Input((None, None, 3))
    a = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    a = keras.layers.ReLU()(keras.layers.BatchNormalization()(a))  # folded
    d = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False)(a)
    d = keras.layers.BatchNormalization(scale=False)(d)  # folded
    shared = keras.layers.Conv2D(16, 1)(d)
    branch = keras.layers.BatchNormalization()(shared)  # its conv feeds two layers: kept
    joined = keras.layers.Add()([branch, shared])
    out = keras.layers.BatchNormalization()(joined)  # after an Add: kept
    model = keras.Model(inputs, out)
    _randomize_statistics(model, 2)
    assert len(batch_norm_folding.foldable_pairs(model)) == 2
    folded = batch_norm_folding.folded_structure(model)
    batch_norm_folding.copy_folded(model, folded)
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds.count("FoldedBatchNormalization") == 2 and kinds.count("BatchNormalization") == 2
    x = np.random.default_rng(3).uniform(-1, 1, (2, 9, 7, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "torchvision_resnet50"])
def test_for_inference_keeps_the_descriptors(backbone, tmp_path):
    config = DescriptorConfig(backbone=backbone, weights=None, whitening_dim=32, scales=(1.0, 0.75))
    model = build_descriptor_model(config, image_size=96)
    _randomize_statistics(model.backbone, 4)
    folded = for_inference(model)
    assert folded.config.fold_batch_norm and not model.config.fold_batch_norm
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.backbone.layers)
    assert for_inference(folded) is folded
    x = np.random.default_rng(5).uniform(0, 255, (2, 96, 80, 3)).astype("float32")
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(folded(x)), expected, atol=1e-5)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.models.load_model(tmp_path / "folded.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, atol=1e-5)
    bf16 = for_inference(folded, "bfloat16")
    cosine = np.sum(np.asarray(bf16(x)) * expected, 1)
    assert bf16.config.dtype == "bfloat16" and cosine.min() > 0.97


def test_training_refuses_a_folded_backbone():
    with pytest.raises(ValueError, match="for inference"):
        TrainConfig(descriptor=DescriptorConfig(fold_batch_norm=True))
