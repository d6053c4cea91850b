"""ResNet-50/101/152 in torchvision's layout (ResNet v1.5), as Keras layers,
and the loading of torchvision-named PyTorch weights into them.

The layout of the PyTorch retrieval models (cirtorch, dirtorch) differs from
`keras.applications.ResNet*` in ways that change every activation:

- a bottleneck's stride sits on its 3x3 convolution, not on the first 1x1;
- convolutions have no bias, batch norm has ``eps = 1e-5``;
- padding is explicit and symmetric (``ZeroPadding2D`` then ``valid``):
  TensorFlow's ``same`` pads 0 before and 1 after at stride 2, PyTorch
  pads both sides;
- the stem's max-pooling pads by one on each side (zeros suffice: it follows
  a ReLU, so nothing is negative).

Layers carry torchvision's names (``conv1``, ``bn1``, ``layer3.4.conv2``,
``layer1.0.downsample.0``, ...), so a state dict maps onto them by name.
"""

import keras
import numpy as np

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
BN_EPSILON = 1e-5


def _conv(x, filters, kernel, stride, name):
    pad = kernel // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}.pad")(x)
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=name)(x)


def _bn(x, name):
    # PyTorch's momentum 0.1 is Keras's 0.9.
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9, name=name)(x)


def _bottleneck(x, planes, stride, name):
    shortcut = x
    out = keras.layers.ReLU(name=f"{name}.relu1")(_bn(_conv(x, planes, 1, 1, f"{name}.conv1"), f"{name}.bn1"))
    out = keras.layers.ReLU(name=f"{name}.relu2")(_bn(_conv(out, planes, 3, stride, f"{name}.conv2"), f"{name}.bn2"))
    out = _bn(_conv(out, planes * 4, 1, 1, f"{name}.conv3"), f"{name}.bn3")
    if stride != 1 or x.shape[-1] != planes * 4:
        shortcut = _bn(_conv(x, planes * 4, 1, stride, f"{name}.downsample.0"), f"{name}.downsample.1")
    return keras.layers.ReLU(name=f"{name}.relu")(keras.layers.Add(name=f"{name}.add")([out, shortcut]))


def build(depth="resnet101"):
    """The trunk (``conv1`` to ``layer4``) of a torchvision ResNet, from
    preprocessed ``[N, H, W, 3]`` images to its ``[N, H/32, W/32, 2048]`` map.

    Example:
    >>> trunk = build("resnet50")
    >>> trunk(np.zeros((1, 224, 224, 3), "float32")).shape
    (1, 7, 7, 2048)
    """
    if depth not in BLOCKS:
        raise ValueError(f"Unknown torchvision ResNet {depth!r}; choose one of {sorted(BLOCKS)}.")
    inputs = keras.Input((None, None, 3))
    x = keras.layers.ReLU(name="relu")(_bn(_conv(inputs, 64, 7, 2, "conv1"), "bn1"))
    x = keras.layers.ZeroPadding2D(1, name="maxpool.pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, (count, planes) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512)), start=1):
        for block in range(count):
            stride = 2 if block == 0 and stage > 1 else 1
            x = _bottleneck(x, planes, stride, f"layer{stage}.{block}")
    return keras.Model(inputs, x, name=f"torchvision_{depth}")


def load_torch_state(trunk, state, source="checkpoint"):
    """Copies torchvision-named tensors (``{name: ndarray}``, e.g.
    ``layer1.0.conv1.weight``) into ``trunk`` (from `build`).

    Convolution kernels go from ``[out, in, kh, kw]`` to ``[kh, kw, in, out]``
    (biases, where a convolution has one, are copied);
    batch norm's ``weight, bias, running_mean, running_var`` become
    ``gamma, beta, moving_mean, moving_variance``. Every weight of the trunk
    must be found with its shape; entries of ``state`` outside the trunk are
    returned, untouched.

    Returns:
        The names of ``state`` that were not used.
    """
    used = set()
    for layer in trunk.layers:
        if isinstance(layer, keras.layers.Conv2D):
            keys = [f"{layer.name}.weight"] + ([f"{layer.name}.bias"] if layer.use_bias else [])
            convert = [lambda w: np.transpose(w, (2, 3, 1, 0)), lambda b: b]
        elif isinstance(layer, keras.layers.BatchNormalization):
            keys = [f"{layer.name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            convert = [lambda w: w] * 4
        else:
            continue
        values = []
        for key, fn, variable in zip(keys, convert, layer.weights):
            if key not in state:
                raise ValueError(f"{source}: no tensor {key!r} for the {trunk.name} trunk (found "
                                 f"{len(state)} tensors, e.g. {', '.join(sorted(state)[:4])})")
            value = fn(np.asarray(state[key], np.float32))
            if value.shape != tuple(variable.shape):
                raise ValueError(f"{source}: {key!r} has shape {np.shape(state[key])}, the {trunk.name} trunk "
                                 f"needs {tuple(variable.shape)} (another depth or width?)")
            values.append(value)
            used.add(key)
        layer.set_weights(values)
    return sorted(set(state) - used)
