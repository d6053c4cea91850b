import keras
import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
from tests import keras_utils, reference


def _tiny(**kwargs):
    kwargs = {"backbone": "tiny", "weights": None, **kwargs}
    return build_descriptor_model(DescriptorConfig(**kwargs))


def _images(n=2, h=70, w=90, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, h, w, 3)).astype("float32")


def test_matches_numpy_pipeline():
    model = _tiny(scales=(0.75, 1.0), whitening_dim=32, include_global=True)
    rng = np.random.RandomState(1)
    mean, proj = rng.randn(128).astype("float32") * 0.01, rng.randn(128, 32).astype("float32")
    model.head.pca.set_pca(mean, proj)
    images = _images()
    got = np.asarray(model(images))
    pre = images / 127.5 - 1.0
    want = []
    for image in pre:
        total = 0
        for s in (0.75, 1.0):
            h, w = int(np.floor(70 * s + 0.5)), int(np.floor(90 * s + 0.5))
            x = reference.bilinear_resize(image, h, w) if s != 1 else image
            fmap = np.asarray(model.backbone(x[None].astype("float32")))[0]
            total = total + reference.rmac(fmap, 3, True, mean, proj)
        want.append(reference.l2n(total))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    assert got.shape == (2, model.descriptor_size) == (2, 32)


def test_round_trip_and_config(tmp_path):
    model = _tiny(whitening_dim=16, levels=2)
    images = _images()
    before = np.asarray(model(images))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(images)), before, atol=1e-6)
    assert loaded.config == DescriptorConfig(
        backbone="tiny", weights=None, levels=2, whitening_dim=16
    )


def test_one_graph_serves_all_image_sizes():
    model = _tiny(whitening_dim=8)
    fn = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 3])])
    for h, w in [(70, 90), (90, 70), (48, 48), (33, 200)]:
        images = _images(h=h, w=w)
        np.testing.assert_allclose(fn(images).numpy(), np.asarray(model(images)), atol=1e-5)
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((1, 64, 64, 3), "uint8"), "dtype uint8"),
        (np.zeros((1, 64, 64, 4), "float32"), "3 RGB channels, got 4"),
        (np.zeros((1, 64, 64, 1), "float32"), "3 RGB channels, got 1"),
        (np.zeros((1, 15, 64, 3), "float32"), "15x64 pixels is too small"),
        (np.zeros((64, 64, 3), "float32"), r"shape \[N, H, W, 3\]"),
    ],
)
def test_bad_input_raises_value_error(images, message):
    with pytest.raises(ValueError, match=message):
        _tiny(scales=(1.0,))(images)


def test_min_image_size_accounts_for_smallest_scale():
    model = _tiny(scales=(0.5, 1.0))
    # 31 * 0.5 = 15.5 rounds up to 16 = one stride; 30 * 0.5 = 15 does not.
    assert model.min_image_size == 31
    model(np.zeros((1, 31, 31, 3), "float32"))
    with pytest.raises(ValueError, match="at least 31 pixels"):
        model(np.zeros((1, 30, 40, 3), "float32"))


@pytest.mark.parametrize("regions", ["grid", "rpn"])
def test_jax_backend_gives_the_same_descriptors(tmp_path, regions):
    # One scale for the RPN: eager JAX compiles its NMS loop at every call.
    scales = (1.0,) if regions == "rpn" else DescriptorConfig.scales
    model = _tiny(whitening_dim=32, include_global=True, regions=regions, proposals=64, scales=scales)
    model.head.pca.set_pca(
        np.random.RandomState(3).randn(128) * 0.01,
        np.random.RandomState(4).randn(128, 32),
    )
    inputs = {"a": _images(h=70, w=90), "b": _images(n=3, h=100, w=64, seed=5)}
    keras_utils.assert_same_on_jax(model, inputs, tmp_path)


def test_rpn_model_round_trips_and_serves_all_sizes(tmp_path):
    model = _tiny(whitening_dim=16, regions="rpn", proposals=32, pre_nms_proposals=100,
                  scales=(0.75, 1.0))
    images = _images()
    before = np.asarray(model(images))
    np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1, atol=1e-5)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(images)), before, atol=1e-6)
    assert loaded.config.regions == "rpn" and loaded.config.proposals == 32
    assert loaded.head.rpn is not None
    fn = tf.function(loaded, input_signature=[tf.TensorSpec([None, None, None, 3])])
    for h, w in [(70, 90), (48, 120)]:
        x = _images(h=h, w=w)
        np.testing.assert_allclose(fn(x).numpy(), np.asarray(model(x)), atol=1e-5)
    assert fn.experimental_get_tracing_count() == 1


def test_a_saved_model_reloads_with_its_image_size(tmp_path):
    from deep_retrieval.model.descriptor_model import image_size_of

    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None), image_size=240)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert loaded.image_size == 240 and image_size_of(loaded) == 240 and image_size_of(loaded, 300) == 300
    unsized = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None))
    assert unsized.image_size is None
    with pytest.raises(ValueError, match="pass --image_size"):
        image_size_of(unsized)


def test_bfloat16_backbone_float32_head_and_descriptor(tmp_path):
    import keras

    from deep_retrieval.model.descriptor_model import for_inference

    config = DescriptorConfig(backbone="tiny", weights=None, whitening_dim=16, scales=(1.0, 0.5))
    f32 = build_descriptor_model(config, image_size=64)
    bf16 = for_inference(f32, "bfloat16")
    assert for_inference(bf16) is bf16 and bf16.config.dtype == "bfloat16"
    convs = [layer for layer in bf16.backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert {layer.compute_dtype for layer in convs} == {"bfloat16"}
    assert {v.dtype for v in bf16.weights} == {"float32"}  # weights stay float32
    assert bf16.head.compute_dtype == "float32" and keras.config.dtype_policy().name == "float32"
    x = np.random.RandomState(0).uniform(0, 255, (3, 64, 48, 3)).astype("float32")
    a, b = np.asarray(f32(x)), np.asarray(bf16(x))
    assert b.dtype == np.float32
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.99 and np.abs(a - b).max() > 1e-6
    bf16.save(tmp_path / "bf16.keras")
    loaded = keras.models.load_model(tmp_path / "bf16.keras")
    assert loaded.config.dtype == "bfloat16"
    np.testing.assert_allclose(np.asarray(loaded(x)), b, atol=1e-6)
