"""Helpers shared by the layer tests."""

import os

import keras
import numpy as np


def keras_round_trip(model, inputs, tmp_path):
    """Saves ``model`` as .keras, reloads it, checks config and outputs agree.

    Returns the reloaded model.
    """
    path = os.path.join(str(tmp_path), "model.keras")
    before = keras.ops.convert_to_numpy(model(inputs))
    model.save(path)
    loaded = keras.models.load_model(path)
    after = keras.ops.convert_to_numpy(loaded(inputs))
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    return loaded


def wrap(layer, input_shape, output_index=None):
    """A functional model around ``layer`` (for .keras round trips)."""
    inputs = keras.Input(input_shape)
    outputs = layer(inputs)
    if output_index is not None:
        outputs = outputs[output_index]
    return keras.Model(inputs, outputs)
