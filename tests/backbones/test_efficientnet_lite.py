"""EfficientNet-Lite0 and -Lite2 against the PyTorch reference implementation
of the same weights (``efficientnet-lite-pytorch``), on real photographs."""

import numpy as np
import pytest

from deep_retrieval.backbones import efficientnet_lite, registry
from deep_retrieval.data import photos
from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
from tests import keras_utils, reference

torch = pytest.importorskip("torch")
lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")


def _real_photos(count=3):
    """Real photographs, cropped to sides that are multiples of 32."""
    try:
        found = [p for p in photos.training_photos() if not p.cutout]
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = []
    for photo in found[::max(1, len(found) // count)][:count]:
        img = photo.image()
        img.thumbnail((352, 352))
        w, h = img.size
        out.append(np.asarray(img.crop((0, 0, w - w % 32, h - h % 32)), np.float32))
    return out


VARIANTS = ["efficientnet_lite0", "efficientnet_lite2"]


@pytest.fixture(scope="module", params=VARIANTS)
def variant_and_torch_model(request):
    variant = request.param
    # image_size=None: TF "SAME" padding computed for each input, as the
    # Keras layers do (by default the reference fixes it for 224 or 260 px).
    net = lite_pytorch.EfficientNet.from_pretrained(
        variant.replace("_", "-"), weights_path=efficientnet_lite.imagenet_checkpoint_path(variant), image_size=None
    )
    return variant, net.eval()


def _torch_features(net, image):
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((image / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]
    with torch.no_grad():
        return net.extract_features(torch.from_numpy(x)).numpy()[0].transpose(1, 2, 0)


def _cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_descriptors_match_pytorch_on_real_photos(variant_and_torch_model):
    variant, torch_model = variant_and_torch_model
    model = build_descriptor_model(DescriptorConfig(backbone=variant, weights="imagenet", scales=(1.0,)))
    for image in _real_photos():
        want_map = _torch_features(torch_model, image)
        got_map = np.asarray(model.backbone(model.preprocess(image[None])))[0]
        assert got_map.shape == want_map.shape and want_map.shape[-1] == 1280
        assert _cosine(got_map, want_map) >= 0.9999
        want = reference.rmac(want_map, levels=3)
        got = np.asarray(model(image[None]))[0]
        assert _cosine(got, want) >= 0.9999


@pytest.mark.parametrize("variant, blocks", [("efficientnet_lite0", 16), ("efficientnet_lite2", 21)])
def test_architecture_and_converted_weights(variant, blocks):
    model, spec = registry.build_backbone(variant, weights="imagenet")
    assert spec.stride == 32 and spec.channels == 1280 and spec.preprocessing == "torch"
    state = efficientnet_lite.torch_checkpoint.load(efficientnet_lite.imagenet_checkpoint_path(variant))
    used = efficientnet_lite.load_torch_state(efficientnet_lite.build(variant=variant), state)
    # Every tensor of the trunk is used; only the classifier and BN counters are not.
    unused = {k for k in state if k not in used}
    assert all(k.startswith("_fc.") or k.endswith("num_batches_tracked") for k in unused)
    assert len([k for k in state if k.endswith("_depthwise_conv.weight")]) == blocks
    # The cached conversion is what a second build loads.
    last = f"_blocks.{blocks - 1}._project_conv.weight"
    np.testing.assert_array_equal(
        model.get_layer(f"blocks_{blocks - 1}_project_conv").kernel, np.transpose(state[last], (2, 3, 1, 0)),
    )


def test_jax_backend_gives_the_same_descriptors(tmp_path):
    model = build_descriptor_model(
        DescriptorConfig(backbone="efficientnet_lite0", weights="imagenet", whitening_dim=None)
    )
    images = _real_photos(2)
    inputs = {"a": images[0][None, :160, :224], "b": np.stack([images[1][:128, :96]] * 2)}
    keras_utils.assert_same_on_jax(model, inputs, tmp_path)
