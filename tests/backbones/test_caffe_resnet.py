import numpy as np
import pytest

from deep_retrieval.backbones import caffe_resnet, registry

torch = pytest.importorskip("torch")


def test_msra_names_strides_and_ceil_mode_pooling():
    trunk = caffe_resnet.build("resnet101")
    names = {layer.name for layer in trunk.layers}
    assert {"conv1", "bn_conv1", "res2a_branch1", "bn3b3_branch2c", "res4b22_branch2c", "res5c"} <= names
    assert "scale_conv1" not in names  # folded into bn_conv1
    stride = {layer.name: layer.strides for layer in trunk.layers if hasattr(layer, "strides")}
    assert stride["res3a_branch2a"] == (2, 2) and stride["res3a_branch2b"] == (1, 1)  # v1: on the first 1x1
    # pool1's output equals torch's ceil_mode max-pooling for even and odd inputs.
    pool1 = trunk.get_layer("pool1")
    for side in (112, 113, 120, 57):
        x = np.random.RandomState(side).rand(1, side, side + 3, 2).astype("float32")
        padded = trunk.get_layer("pool1.pad")(x)
        want = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 2, ceil_mode=True)
        np.testing.assert_array_equal(np.asarray(pool1(padded)), want.permute(0, 2, 3, 1).numpy())
    assert registry.SPECS["caffe_resnet101"].preprocessing == "caffe"


def test_loading_divides_by_the_stored_scale_factor_and_names_what_is_missing():
    trunk = caffe_resnet.build("resnet50")
    rng = np.random.RandomState(0)
    blobs = {}
    for spec in caffe_resnet.caffe_layers("resnet50"):
        if spec["type"] == "Convolution":
            kh, kw, cin, cout = trunk.get_layer(spec["name"]).kernel.shape
            blobs[spec["name"]] = [rng.rand(cout, cin, kh, kw).astype("float32")]
        elif spec["type"] == "BatchNorm":
            c = trunk.get_layer(spec["name"]).gamma.shape[0]
            blobs[spec["name"]] = [np.full(c, 6.0), np.full(c, 8.0), np.array([2.0])]
        elif spec["type"] == "Scale":
            blobs[spec["name"]] = [np.full(c, 1.5), np.full(c, -0.5)]
    assert caffe_resnet.load_caffe_blobs(trunk, "resnet50", {**blobs, "fc1000": [np.zeros(3)]}) == ["fc1000"]
    bn = trunk.get_layer("bn4f_branch2b")
    np.testing.assert_array_equal(np.asarray(bn.moving_mean), 3.0)
    np.testing.assert_array_equal(np.asarray(bn.moving_variance), 4.0)
    np.testing.assert_array_equal(np.asarray(bn.gamma), 1.5)
    kernel = np.asarray(trunk.get_layer("res3a_branch2b").kernel)
    np.testing.assert_array_equal(kernel[1, 2, 3, 4], blobs["res3a_branch2b"][0][4, 3, 1, 2])
    del blobs["scale5a_branch1"]
    with pytest.raises(ValueError, match="no weights for layer 'scale5a_branch1'"):
        caffe_resnet.load_caffe_blobs(trunk, "resnet50", blobs)
