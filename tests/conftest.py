"""Test setup: nothing is written to ~/.keras, TensorFlow stays quiet."""

import os
import tempfile

os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras_home_"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
