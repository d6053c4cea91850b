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
import deep_retrieval.model.descriptor_model  # registers the classes
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


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def run_layer_test(layer_cls, init_kwargs, input_data, expected_output_shape, tmp_path, mixed_precision=True,
                   atol=1e-6):
    """The checks every layer gets (after KerasHub's ``run_layer_test``):

    * built from ``init_kwargs`` and called on ``input_data`` (an array, or
      a list of arrays for several inputs), its outputs have
      ``expected_output_shape`` (a shape, or a list of shapes), and
      ``compute_output_shape`` agrees (``None`` matching any size);
    * ``from_config(get_config())`` with the same weights gives the same
      outputs;
    * a model holding it survives a ``.keras`` save and reload;
    * under the ``mixed_bfloat16`` policy it computes in bfloat16 and stays
      within bfloat16 precision of float32.
    """
    inputs = _as_list(input_data)
    layer = layer_cls(**init_kwargs)
    outputs = [keras.ops.convert_to_numpy(o) for o in _as_list(layer(*inputs))]
    expected = expected_output_shape if isinstance(expected_output_shape, list) else [expected_output_shape]
    assert [tuple(o.shape) for o in outputs] == [tuple(s) for s in expected], [o.shape for o in outputs]
    computed = layer.compute_output_shape(*[tuple(x.shape) for x in inputs])
    computed = computed if isinstance(computed, list) or (computed and isinstance(computed[0], tuple)) else [computed]
    for got, want in zip(computed, expected):
        assert len(got) == len(want) and all(g is None or g == w for g, w in zip(got, want)), (computed, expected)

    clone = layer_cls.from_config(layer.get_config())
    clone(*inputs)
    clone.set_weights(layer.get_weights())
    for a, b in zip(_as_list(clone(*inputs)), outputs):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), b, rtol=0, atol=atol)

    symbolic = [keras.Input(tuple(x.shape[1:]), dtype=str(x.dtype)) for x in inputs]
    model = keras.Model(symbolic if len(symbolic) > 1 else symbolic[0], layer(*symbolic))
    path = os.path.join(str(tmp_path), f"{layer_cls.__name__}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(_as_list(loaded(inputs if len(inputs) > 1 else inputs[0])), outputs):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), b, rtol=0, atol=atol)

    if mixed_precision:
        mixed = layer_cls(**init_kwargs, dtype="mixed_bfloat16")
        mixed(*inputs)
        mixed.set_weights(layer.get_weights())
        assert mixed.compute_dtype == "bfloat16" and all(v.dtype == "float32" for v in mixed.weights)
        for a, b in zip(_as_list(mixed(*inputs)), outputs):
            a = keras.ops.convert_to_numpy(keras.ops.cast(a, "float32"))
            if b.dtype.kind == "f":
                scale = max(1.0, float(np.abs(b).max()))
                np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * scale)
            else:
                np.testing.assert_array_equal(a, b)
