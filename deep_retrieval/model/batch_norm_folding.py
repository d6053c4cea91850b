"""Batch normalization folded into the convolution before it, for inference.

At inference a batch-norm layer is a per-channel affine map,
``y = γ (x - μ) / sqrt(σ² + ε) + β``. After a convolution ``x = W * u + b``
the two are one convolution with ``W' = W s`` and ``b' = (b - μ) s + β``,
where ``s = γ / sqrt(σ² + ε)`` is taken per output channel. Folding removes
one pass over every feature map: about a quarter of a bfloat16 ResNet-101
call on a CPU (`benchmarks/onednn_profile.py`). It also leaves TensorFlow a
``Conv2D + BiasAdd (+ ReLU)`` pattern that it runs as one oneDNN primitive.

A folded backbone is for inference only. Training updates the statistics
and the affine terms separately, so it keeps the layers apart.
"""

import keras
import numpy as np

CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def fold(kernel, bias, gamma, beta, mean, variance, epsilon, depthwise=False):
    """``(kernel, bias)`` of the convolution equal to ``kernel``/``bias``
    followed by inference batch norm (see the module docstring).

    Args:
        kernel: ``[kh, kw, in, out]`` (``[kh, kw, in, multiplier]`` when
            ``depthwise``, whose output channel ``c * multiplier + m``).
        bias: ``[out]`` or None (no bias).
        gamma, beta, mean, variance: ``[out]``; ``gamma``/``beta`` None for a
            batch norm without scale/center.
        epsilon: the batch norm's epsilon.
    """
    kernel = np.asarray(kernel, np.float64)
    mean = np.asarray(mean, np.float64)
    scale = 1.0 / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    if gamma is not None:
        scale = scale * np.asarray(gamma, np.float64)
    shift = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    bias = np.zeros_like(mean) if bias is None else np.asarray(bias, np.float64)
    if depthwise:
        folded = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:
        folded = kernel * scale
    return folded.astype(np.float32), ((bias - mean) * scale + shift).astype(np.float32)


def foldable_pairs(model):
    """``[(convolution, batch_norm)]`` of a functional model: each batch norm
    over the channels whose one input is a convolution that feeds nothing
    else, both called once."""
    pairs = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        if layer.axis not in (-1, 3):
            continue
        inputs = layer._inbound_nodes[0].input_tensors
        if len(inputs) != 1:
            continue
        parent = inputs[0]._keras_history[0]
        if (isinstance(parent, CONVOLUTIONS) and len(parent._inbound_nodes) == 1
                and len(parent._outbound_nodes) == 1):
            pairs.append((parent, layer))
    return pairs


@keras.saving.register_keras_serializable(package="deep_retrieval")
class FoldedBatchNormalization(keras.layers.Layer):
    """Where a batch norm was, once folded into its convolution: the identity.

    It keeps the batch norm's name, so a folded backbone reads like the
    original one.
    """

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def folded_structure(model):
    """A clone of the functional ``model`` whose `foldable_pairs` are one
    convolution with a bias each (new weights: see `copy_folded`)."""
    pairs = foldable_pairs(model)
    convolutions = {id(conv) for conv, _ in pairs}
    norms = {id(norm) for _, norm in pairs}

    def clone(layer):
        if id(layer) in norms:
            return FoldedBatchNormalization(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        if id(layer) in convolutions:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def copy_folded(source, target):
    """Sets ``target`` (`folded_structure` of ``source``) to compute what
    ``source`` computes at inference."""
    pairs = {conv.name: norm for conv, norm in foldable_pairs(source)}
    for layer in source.layers:
        if not layer.weights or any(n is layer for n in pairs.values()):
            continue
        other = target.get_layer(layer.name)
        norm = pairs.get(layer.name)
        if norm is None:
            other.set_weights(layer.get_weights())
            continue
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        bias = layer.bias if layer.use_bias else None
        values = [None if v is None else keras.ops.convert_to_numpy(v) for v in
                  (layer.kernel, bias, norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance)]
        other.set_weights(list(fold(*values, norm.epsilon, depthwise)))
