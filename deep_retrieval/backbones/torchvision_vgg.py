"""VGG16's convolutions in torchvision's layout (cirtorch's
``retrievalSfM120k-vgg16-gem``), as Keras layers.

cirtorch keeps ``vgg16.features`` without its last max-pooling, so the trunk
ends at ``conv5_3``'s ReLU (stride 16, 512 channels). Its 3x3 convolutions
pad one pixel on each side, which is TensorFlow's ``same`` at stride 1; the
2x2 max-poolings are ``valid`` in both. Layers carry torchvision's names
(``features.0``, ``features.2``, ..., ``features.28``), so cirtorch's state
dict maps onto them by name (`torchvision_resnet.load_torch_state`).
"""

import keras

# Output channels of each convolution, "M" for a 2x2 max-pooling: torchvision's
# configuration "D" without the last pooling.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def build(depth="vgg16"):
    """The trunk of torchvision's VGG16, from preprocessed ``[N, H, W, 3]``
    images to its ``[N, H/16, W/16, 512]`` map.

    Example:
    >>> build()(np.zeros((1, 64, 96, 3), "float32")).shape
    (1, 4, 6, 512)
    """
    if depth != "vgg16":
        raise ValueError(f"Unknown torchvision VGG {depth!r}; only 'vgg16' is released by cirtorch.")
    inputs = keras.Input((None, None, 3))
    x = inputs
    for position, filters in _indexed(VGG16):
        if filters == "M":
            x = keras.layers.MaxPooling2D(2, strides=2, name=f"features.{position}")(x)
        else:
            x = keras.layers.Conv2D(filters, 3, padding="same", name=f"features.{position}")(x)
            x = keras.layers.ReLU(name=f"features.{position + 1}")(x)
    return keras.Model(inputs, x, name="torchvision_vgg16")


def _indexed(config):
    """``(index in torchvision's features, entry)``: a convolution and its
    ReLU take two indices, a pooling one."""
    position = 0
    for entry in config:
        yield position, entry
        position += 1 if entry == "M" else 2
