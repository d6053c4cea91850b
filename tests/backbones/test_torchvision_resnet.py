import numpy as np
import pytest

from deep_retrieval.backbones import torchvision_resnet


def test_layout_names_and_shapes():
    trunk = torchvision_resnet.build("resnet50")
    assert trunk(np.zeros((1, 224, 160, 3), "float32")).shape == (1, 7, 5, 2048)
    names = {layer.name for layer in trunk.layers}
    assert {"conv1", "bn1", "layer1.0.downsample.0", "layer4.2.conv3", "layer3.5.bn2"} <= names
    stride = {layer.name: layer.strides for layer in trunk.layers if hasattr(layer, "strides")}
    assert stride["layer2.0.conv1"] == (1, 1) and stride["layer2.0.conv2"] == (2, 2)  # v1.5: on the 3x3
    assert not any(layer.use_bias for layer in trunk.layers if hasattr(layer, "use_bias"))
    assert all(layer.epsilon == 1e-5 for layer in trunk.layers if hasattr(layer, "moving_variance"))


def test_loading_names_what_is_missing_or_misshapen():
    trunk = torchvision_resnet.build("resnet50")
    state = {}
    for layer in trunk.layers:
        for v, suffix in zip(layer.weights, ("weight", "bias", "running_mean", "running_var")):
            shape = tuple(v.shape)
            state[f"{layer.name}.{suffix}"] = np.zeros(shape[::-1] if len(shape) == 4 else shape, np.float32)
    # Conv kernels as torch stores them: [out, in, kh, kw].
    for layer in trunk.layers:
        if hasattr(layer, "kernel_size"):
            kh, kw, cin, cout = layer.kernel.shape
            state[f"{layer.name}.weight"] = np.random.RandomState(0).rand(cout, cin, kh, kw).astype("float32")
    state["fc.weight"] = np.zeros((10, 2048))
    assert torchvision_resnet.load_torch_state(trunk, state) == ["fc.weight"]
    w = state["layer1.0.conv2.weight"]
    np.testing.assert_array_equal(np.asarray(trunk.get_layer("layer1.0.conv2").kernel), w.transpose(2, 3, 1, 0))
    missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(ValueError, match="no tensor 'layer3.1.bn2.running_var'"):
        torchvision_resnet.load_torch_state(trunk, missing, "m.pth")
    wrong = {**state, "conv1.weight": np.zeros((64, 3, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"m.pth: 'conv1.weight' has shape \(64, 3, 3, 3\)"):
        torchvision_resnet.load_torch_state(trunk, wrong, "m.pth")
    with pytest.raises(ValueError, match="Unknown torchvision ResNet 'resnet18'"):
        torchvision_resnet.build("resnet18")


def test_gem_descriptor_model_on_this_backend_and_jax(tmp_path):
    from deep_retrieval.config import DescriptorConfig
    from deep_retrieval.model.descriptor_model import build_descriptor_model
    from tests import keras_utils

    model = build_descriptor_model(DescriptorConfig(backbone="torchvision_resnet50", weights=None, pooling="gem",
                                                    fc_dim=64, scales=(1.0, 0.5), multiscale_power=3.0),
                                   image_size=96)
    x = np.random.RandomState(3).uniform(0, 255, (2, 96, 72, 3)).astype("float32")
    assert model(x).shape == (2, 64)
    keras_utils.assert_same_on_jax(model, {"x": x}, tmp_path)
