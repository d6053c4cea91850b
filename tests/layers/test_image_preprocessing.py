import keras
import numpy as np
import pytest

from deep_retrieval.layers import ImagePreprocessing
from tests import keras_utils


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_matches_keras_applications(mode, tmp_path):
    x = np.random.RandomState(0).uniform(0, 255, (2, 5, 6, 3)).astype("float32")
    want = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode)
    model = keras_utils.wrap(ImagePreprocessing(mode), (5, 6, 3))
    np.testing.assert_allclose(np.asarray(model(x)), want, atol=1e-4)
    keras_utils.keras_round_trip(model, x, tmp_path)


def test_unknown_mode():
    with pytest.raises(ValueError, match="Unknown preprocessing mode"):
        ImagePreprocessing("bgr")


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.uniform(0, 255, (2, 5, 6, 3)).astype("float32")
    keras_utils.run_layer_test(ImagePreprocessing, dict(mode="torch"), inputs, (2, 5, 6, 3), tmp_path)
