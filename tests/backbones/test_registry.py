import numpy as np
import pytest

from deep_retrieval.backbones import registry


@pytest.mark.parametrize(
    "name,size,cells",
    [("tiny", 64, 4), ("vgg16", 64, 4), ("resnet50", 64, 2)],
)
def test_cut_at_last_convolution(name, size, cells):
    model, spec = registry.build_backbone(name, weights=None)
    out = model(np.zeros((1, size, size + spec.stride, 3), "float32"))
    assert tuple(out.shape) == (1, cells, cells + 1, spec.channels)
    assert size // spec.stride == cells


def test_resnet101_has_101_layers_worth_of_blocks():
    model, spec = registry.build_backbone("resnet101", weights=None)
    assert model.layers[-1].name == "conv5_block3_out"
    assert len([x for x in model.layers if x.name.startswith("conv4_block") and x.name.endswith("_out")]) == 23
    assert spec.stride == 32 and spec.channels == 2048


def test_local_weights_file(tmp_path):
    model, _ = registry.build_backbone("tiny")
    path = str(tmp_path / "tiny.weights.h5")
    model.save_weights(path)
    again, _ = registry.build_backbone("tiny", weights=path)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="Unknown backbone"):
        registry.build_backbone("resnet18")
    with pytest.raises(ValueError, match="does not exist"):
        registry.build_backbone("tiny", weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="no ImageNet weights"):
        registry.build_backbone("tiny", weights="imagenet")
