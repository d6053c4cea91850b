"""`.keras` models saved before the package took its sub-packages (the flat
layout of commit 0341264) load, and give the descriptors they gave then.

`tests/fixtures/layout_v1` holds three tiny models saved by that code (the
rigid grid with two scales, RPN proposals, and a folded GeM head with
post-whitening) and their descriptors for fixed images, computed then: the
reference is the old code's output, not this code's."""

import os

import numpy as np
import pytest

from deep_retrieval.model import load_descriptor_model

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "layout_v1")


@pytest.mark.parametrize("name", ["grid", "rpn", "gem"])
def test_a_model_saved_by_the_flat_layout_loads_and_describes_as_it_did(name):
    model, size = load_descriptor_model(f"{FIXTURES}/{name}.keras")
    assert size == 128
    images = np.load(f"{FIXTURES}/images.npy")
    then = np.load(f"{FIXTURES}/{name}.npy")
    now = np.asarray(model.predict(images, verbose=0))
    np.testing.assert_allclose(now, then, rtol=1e-4, atol=1e-5)
