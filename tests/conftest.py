"""Test setup: nothing is written to ~/.keras, TensorFlow stays quiet."""

import os
import tempfile

os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras_home_"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A small descriptor model saved as .keras and exported as version 1.

    Returns a dict: ``keras`` (path), ``base`` (model base path), ``version``
    (the SavedModel folder), ``image_size``, ``model`` (the Keras model).
    """
    import numpy as np

    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
    from export import export_saved_model

    root = tmp_path_factory.mktemp("export")
    model = build_descriptor_model(
        DescriptorConfig(backbone="tiny", weights=None, whitening_dim=32, scales=(0.75, 1.0))
    )
    rng = np.random.RandomState(0)
    model.head.pca.set_pca(rng.randn(128) * 0.01, rng.randn(128, 32))
    path = str(root / "model.keras")
    model.save(path)
    base = root / "models" / "deep_retrieval"
    export_saved_model.export(path, str(base / "1"), image_size=96)
    return {"keras": path, "base": str(base), "version": str(base / "1"), "image_size": 96, "model": model}


@pytest.fixture(scope="module")
def address(exported):
    """``host:port`` of an embedded server (in this process) serving ``exported``."""
    from serving import service as server_lib
    from serving.model_manager import ModelManager

    manager = ModelManager("deep_retrieval", exported["base"], poll_seconds=0)
    server, port = server_lib.build_server(manager, 0)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)
