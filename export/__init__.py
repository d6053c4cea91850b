"""SavedModel export for TensorFlow Serving (``python -m export.export_saved_model``)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
