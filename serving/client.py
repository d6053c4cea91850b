"""The PredictionService client side, in one place: channels, requests,
responses and retries, shared by extraction, search, the load test and the
export's warm-up requests. Only TF Serving's public protocol is used, so
every caller works unchanged against the real server."""

import random
import time

MAX_MESSAGE_BYTES = 256 << 20
"""Channel message limit: gRPC's default of 4 MiB is too small for batches
of images."""

RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
"""Transport trouble: a call is tried again (on another replica)."""


def channel(address, max_message_bytes=MAX_MESSAGE_BYTES):
    """An insecure gRPC channel to ``address`` with the message limit raised."""
    import grpc

    return grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ])


def prediction_stub(address, max_message_bytes=MAX_MESSAGE_BYTES):
    """A ``PredictionService`` stub over `channel`."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(channel(address, max_message_bytes))


def predict_request(model_name, images=None, signature_name="serving_default", boxes=None, version=None,
                    tensor=None):
    """A ``PredictRequest`` for the descriptor signatures.

    Args:
        model_name: ``ModelSpec.name``.
        images: encoded images (bytes), sent as the ``images`` string tensor.
        signature_name: ``serving_default``, ``crops`` or ``pixels``.
        boxes: ``[n, 4]`` pixel boxes, for ``crops``.
        version: ``ModelSpec.version`` to ask for (None: the newest).
        tensor: a ready ``TensorProto`` for ``images`` instead (``pixels``,
            or a hand-made tensor).
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    if tensor is None:
        tensor = tf.make_tensor_proto(list(images), dtype=tf.string, shape=[len(images)])
    request.inputs["images"].CopyFrom(tensor)
    if boxes is not None:
        request.inputs["boxes"].CopyFrom(tf.make_tensor_proto(np.asarray(boxes, np.float32),
                                                              shape=[len(boxes), 4]))
    return request


def descriptors(response):
    """The ``descriptors`` output of a ``PredictResponse`` as float32 ``[n, D]``."""
    import numpy as np
    import tensorflow as tf

    return np.asarray(tf.make_ndarray(response.outputs["descriptors"]), np.float32)


def with_retries(call, retries, retryable=RETRYABLE):
    """``call(attempt)`` until it returns, retrying a gRPC error whose code
    is in ``retryable`` with exponential backoff (jittered, at most 5 s),
    ``retries`` attempts in all; the last error is raised."""
    import grpc

    delay = 0.2
    for attempt in range(retries):
        try:
            return call(attempt)
        except grpc.RpcError as e:
            if e.code().name not in retryable or attempt == retries - 1:
                raise
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 5.0)
    raise ValueError("retries must be at least 1")
