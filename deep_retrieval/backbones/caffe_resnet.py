"""ResNet-50/101/152 as Caffe defines them (Kaiming He's MSRA release, the
trunk of the DIR Caffe network), as Keras layers, and the loading of a
``.caffemodel``'s blobs into them.

The Caffe layout differs from torchvision's (`torchvision_resnet`) in ways
that change every activation:

- a bottleneck's stride sits on its first 1x1 convolution (``branch2a``)
  and on the projection (``branch1``), not on the 3x3;
- batch norm is two layers: ``BatchNorm`` (stored mean and variance, both
  multiplied by a stored scale factor, ``eps = 1e-5``) and ``Scale``
  (gamma, beta), one Keras ``BatchNormalization`` here;
- ``pool1`` is 3x3 / 2 without padding in Caffe's ceil mode, which takes
  one more window than floor mode when ``H - 3`` is odd: here a zero row and
  column after the map, harmless after a ReLU, then valid pooling.

`caffe_layers` lists the trunk as Caffe layers (names, blobs, settings: what
`deep_retrieval.io.caffe_model.describe` gives for each layer of the
release's ``deploy_resnet101.prototxt``), `build` turns that list into a
Keras model whose layers carry the Caffe names, and `load_caffe_blobs`
copies the weights, so a prototxt can be checked against the list and a
caffemodel loaded by name.
"""

import keras
import numpy as np

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
BN_EPSILON = 1e-5


def _block_suffixes(depth, count):
    """MSRA's block names: letters for ResNet-50 and for 3-block stages,
    otherwise ``a, b1, b2, ...``."""
    if depth == "resnet50" or count <= 3:
        return [chr(ord("a") + i) for i in range(count)]
    return ["a"] + [f"b{i}" for i in range(1, count)]


def _conv(name, bottom, top, num_output, kernel, stride=1, pad=0):
    return {"name": name, "type": "Convolution", "bottom": (bottom,), "top": (top,), "num_output": num_output,
            "kernel": kernel, "stride": stride, "pad": pad, "bias": False}


def _bn_scale(bn, scale, blob):
    return [{"name": bn, "type": "BatchNorm", "bottom": (blob,), "top": (blob,), "eps": BN_EPSILON},
            {"name": scale, "type": "Scale", "bottom": (blob,), "top": (blob,), "bias": True}]


def _relu(name, blob):
    return {"name": name, "type": "ReLU", "bottom": (blob,), "top": (blob,)}


def caffe_layers(depth="resnet101"):
    """The trunk (``data`` to ``res5c``) as Caffe layers, in prototxt order:
    dicts with ``name``, ``type``, ``bottom``, ``top`` and the type's
    settings, as `deep_retrieval.io.caffe_model.describe` gives them."""
    if depth not in BLOCKS:
        raise ValueError(f"Unknown Caffe ResNet {depth!r}; choose one of {sorted(BLOCKS)}.")
    layers = [_conv("conv1", "data", "conv1", 64, 7, 2, 3), *_bn_scale("bn_conv1", "scale_conv1", "conv1"),
              _relu("conv1_relu", "conv1"),
              {"name": "pool1", "type": "Pooling", "bottom": ("conv1",), "top": ("pool1",), "pool": "MAX",
               "kernel": 3, "stride": 2, "pad": 0, "round_mode": "CEIL"}]
    blob = "pool1"
    for stage, (count, planes) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512)), start=2):
        for i, suffix in enumerate(_block_suffixes(depth, count)):
            block = f"{stage}{suffix}"
            stride = 2 if i == 0 and stage > 2 else 1
            shortcut = blob
            if i == 0:
                shortcut = f"res{block}_branch1"
                layers += [_conv(shortcut, blob, shortcut, planes * 4, 1, stride),
                           *_bn_scale(f"bn{block}_branch1", f"scale{block}_branch1", shortcut)]
            previous = blob
            for branch, (width, kernel, pad) in zip("abc", ((planes, 1, 0), (planes, 3, 1), (planes * 4, 1, 0))):
                top = f"res{block}_branch2{branch}"
                layers += [_conv(top, previous, top, width, kernel, stride if branch == "a" else 1, pad),
                           *_bn_scale(f"bn{block}_branch2{branch}", f"scale{block}_branch2{branch}", top)]
                if branch != "c":
                    layers.append(_relu(f"{top}_relu", top))
                previous = top
            layers += [{"name": f"res{block}", "type": "Eltwise", "bottom": (shortcut, previous),
                        "top": (f"res{block}",), "operation": "SUM"}, _relu(f"res{block}_relu", f"res{block}")]
            blob = f"res{block}"
    return layers


def build(depth="resnet101"):
    """The Keras trunk of `caffe_layers`, from Caffe-preprocessed ``[N, H, W,
    3]`` images (BGR, mean subtracted) to the ``res5c`` map (2048 channels,
    stride 32). Convolutions and ReLUs keep their Caffe names; each
    BatchNorm + Scale pair is one ``BatchNormalization`` named after the
    BatchNorm; an Eltwise is an ``Add`` of its name.

    Example:
    >>> trunk = build("resnet50")
    >>> trunk(np.zeros((1, 224, 224, 3), "float32")).shape
    (1, 7, 7, 2048)
    """
    inputs = keras.Input((None, None, 3))
    blobs = {"data": inputs}
    layers = caffe_layers(depth)
    for index, spec in enumerate(layers):
        name, kind = spec["name"], spec["type"]
        x = [blobs[b] for b in spec["bottom"]]
        if kind == "Convolution":
            y = x[0]
            if spec["pad"]:
                y = keras.layers.ZeroPadding2D(spec["pad"], name=f"{name}.pad")(y)
            y = keras.layers.Conv2D(spec["num_output"], spec["kernel"], strides=spec["stride"], padding="valid",
                                    use_bias=spec["bias"], name=name)(y)
        elif kind == "BatchNorm":
            # Scale (the next layer, on the same blob) is this layer's gamma and beta.
            y = keras.layers.BatchNormalization(epsilon=spec["eps"], momentum=0.9, name=name)(x[0])
        elif kind == "Scale":
            y = x[0]
        elif kind == "ReLU":
            y = keras.layers.ReLU(name=name)(x[0])
        elif kind == "Pooling":
            # Ceil mode: stride - 1 zeros after the map give floor mode's
            # count the extra window; its input is a ReLU's, so zeros never win.
            assert layers[index - 1]["type"] == "ReLU" and spec["pad"] == 0
            extra = spec["stride"] - 1
            y = keras.layers.ZeroPadding2D(((0, extra), (0, extra)), name=f"{name}.pad")(x[0])
            y = keras.layers.MaxPooling2D(spec["kernel"], strides=spec["stride"], name=name)(y)
        else:  # Eltwise SUM
            y = keras.layers.Add(name=name)(x)
        blobs[spec["top"][0]] = y
    return keras.Model(inputs, blobs["res5c"], name=f"caffe_{depth}")


def load_caffe_blobs(trunk, depth, blobs, source="caffemodel"):
    """Copies a caffemodel's blobs (``{layer name: [arrays]}``) into
    ``trunk`` (from `build`).

    Convolution weights go from ``[out, in, kh, kw]`` to ``[kh, kw, in,
    out]``. A BatchNorm's ``mean, variance`` are divided by its stored scale
    factor (Caffe's moving-average normaliser; 0 means 0), its Scale's
    ``gamma, beta`` complete the Keras batch norm.

    Returns:
        The names of ``blobs`` that were not used.
    """
    used = set()

    def take(name, count):
        if name not in blobs:
            raise ValueError(f"{source}: no weights for layer {name!r} of the caffe_{depth} trunk")
        if len(blobs[name]) < count:
            raise ValueError(f"{source}: layer {name!r} has {len(blobs[name])} blobs, needs {count}")
        used.add(name)
        return blobs[name]

    layers = caffe_layers(depth)
    for index, spec in enumerate(layers):
        layer = trunk.get_layer(spec["name"]) if spec["type"] in ("Convolution", "BatchNorm") else None
        if spec["type"] == "Convolution":
            values = [np.transpose(take(spec["name"], 1)[0], (2, 3, 1, 0))]
        elif spec["type"] == "BatchNorm":
            mean, variance, factor = take(spec["name"], 3)[:3]
            f = 0.0 if float(np.ravel(factor)[0]) == 0 else 1.0 / float(np.ravel(factor)[0])
            gamma, beta = take(layers[index + 1]["name"], 2)[:2]
            values = [np.ravel(gamma), np.ravel(beta), np.ravel(mean) * f, np.ravel(variance) * f]
        else:
            continue
        for value, variable in zip(values, layer.weights):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{source}: layer {spec['name']!r} has a blob of shape {value.shape}; the "
                                 f"caffe_{depth} trunk needs {tuple(variable.shape)}")
        layer.set_weights([v.astype(np.float32) for v in values])
    return sorted(set(blobs) - used)
