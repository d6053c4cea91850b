"""Serving: the embedded TF Serving-compatible gRPC server, the batch
extraction client, and production configs for the real TensorFlow Serving."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
