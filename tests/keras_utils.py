"""Helpers shared by the layer and model tests."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_JAX_SCRIPT = """
import json, sys
import numpy as np
import keras
import deep_retrieval.model  # registers the classes
assert keras.backend.backend() == "jax", keras.backend.backend()
model = keras.models.load_model(sys.argv[1])
out = {}
for name in sys.argv[3:]:
    out[name] = np.asarray(model(np.load(sys.argv[2] + name + ".npy"))).tolist()
print(json.dumps(out))
"""


def assert_same_on_jax(model, inputs, tmp_path, atol=1e-4):
    """Saves ``model``, runs it on the JAX backend in a subprocess on each of
    ``inputs`` (``{name: array}``) and checks the outputs match this backend's."""
    for name, x in inputs.items():
        np.save(os.path.join(str(tmp_path), f"{name}.npy"), x)
    path = os.path.join(str(tmp_path), "jax_model.keras")
    model.save(path)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _JAX_SCRIPT, path, os.path.join(str(tmp_path), ""), *inputs],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jax_out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, x in inputs.items():
        diff = np.abs(np.asarray(jax_out[name]) - keras.ops.convert_to_numpy(model(x))).max()
        assert diff <= atol, (name, diff)


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
