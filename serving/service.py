"""TensorFlow Serving's gRPC services on a `serving.model_manager.ModelManager`:
``PredictionService`` (Predict, GetModelMetadata) and ``ModelService``
(GetModelStatus), and the Predict core that `serving.rest` shares (see
`serving.server` for the checks and limits)."""

import concurrent.futures
import contextlib
import ctypes
import re
import time

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from deep_retrieval.data.images import decode
from serving.metrics import Metrics
from serving.requests import (
    LIMITS,
    InvalidRequest,
    PixelBudget,
    bounded,
    check_alive,
    check_boxes,
    check_pixels,
    check_proto,
    chunks,
)


def run_signature(version, request, limits=LIMITS, budget=None, context=None):
    """Validates ``request``, then runs its signature chunk by chunk within
    ``budget``; ``(signature name, {output: array})``."""
    import numpy as np
    import tensorflow as tf

    name = request.model_spec.signature_name or "serving_default"
    if name not in version.functions:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{bounded(name)}" not found.')
    fn = version.functions[name]
    specs = fn.structured_input_signature[1]
    unknown = set(request.inputs) - set(specs)
    if unknown or set(specs) - set(request.inputs):
        raise InvalidRequest(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input tensor alias not found in signature: {bounded(', '.join(sorted(unknown))) or '(missing)'}. "
            f"Inputs expected to be in the set {{{', '.join(sorted(specs))}}}.",
        )
    args, sizes = {}, None
    for key, spec in specs.items():
        proto = request.inputs[key]
        try:
            got = tf.dtypes.as_dtype(proto.dtype) if proto.dtype else None
        except TypeError:  # an enum value TF does not know
            got = None
        if got != spec.dtype:
            raise InvalidRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expects arg[{key}] to be {spec.dtype.name} but {got.name if got else 'invalid'} is provided",
            )
        check_proto(key, proto, spec, limits)
        try:
            value = tf.make_ndarray(proto)
        except Exception as e:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: malformed tensor: {e}")
        if not spec.shape.is_compatible_with(value.shape):
            raise InvalidRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {key}: shape {list(value.shape)} does not match the signature's {spec.shape}",
            )
        if value.ndim and value.shape[0] == 0:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: empty batch")
        sizes = check_pixels(key, value, spec, limits) or sizes
        args[key] = value
    if "boxes" in args and "images" in args and specs["images"].dtype == tf.string:
        check_boxes(args["images"], args["boxes"])
    wanted = list(request.output_filter) or list(fn.structured_outputs)
    missing = [k for k in wanted if k not in fn.structured_outputs]
    if missing:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"output tensor alias not found in signature: {bounded(missing)}")
    batch = len(next(iter(args.values())))
    parts = []
    for start, stop, pixels in chunks(sizes or [0] * batch):
        check_alive(context)
        chunk = {k: v[start:stop] for k, v in args.items()}
        with budget.hold(pixels, context) if budget else contextlib.nullcontext():
            try:
                outputs = fn(**{k: tf.constant(v) for k, v in chunk.items()})
            except tf.errors.InvalidArgumentError as e:
                raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, _explain(chunk, specs, e, start))
        parts.append({k: np.asarray(outputs[k]) for k in wanted})
    return name, {k: np.concatenate([p[k] for p in parts]) for k in wanted}


def predict(manager, request, limits, budget, metrics, entrypoint, context=None):
    """One Predict call, from either protocol: ``(version, signature name,
    {output: array})``; recorded in ``metrics`` with its status."""
    start = time.perf_counter()
    status, version = "UNKNOWN", None
    try:
        version = manager.get(request.model_spec)
        signature, outputs = run_signature(version, request, limits, budget, context)
        status = "OK"
        return version, signature, outputs
    except InvalidRequest as e:
        status = e.code.name
        raise
    finally:
        release_memory()
        label = request.model_spec.signature_name or "serving_default"
        if version is None or label not in version.functions:
            label = "(unknown)"  # never a client's string: labels stay few
        metrics.record(manager.name, label, entrypoint, status, time.perf_counter() - start)


def _explain(args, specs, error, offset=0):
    """Names the undecodable image of a failed string batch, if that was it
    (positions counted from ``offset``, the chunk's start)."""
    import tensorflow as tf

    for key, spec in specs.items():
        if spec.dtype != tf.string:
            continue
        for position, data in enumerate(args[key].reshape(-1), start=offset):
            try:
                decode(data)  # refuses decompression bombs before decoding
            except tf.errors.InvalidArgumentError as e:
                return f"{key}[{position}]: cannot decode image: {_clean(e.message)}"
    return _clean(error.message)


def _clean(message):
    """A TF error message without its graph-node decorations."""
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", message.splitlines()[0])
    return " ".join(text.split())


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``PredictionService`` servicer (Predict, GetModelMetadata)."""

    def __init__(self, manager, limits=LIMITS, budget=None, metrics=None):
        self.manager, self.limits = manager, limits
        self.budget = budget or PixelBudget(LIMITS.pixels)
        self.metrics = metrics or Metrics()

    def Predict(self, request, context):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        try:
            version, signature, outputs = predict(self.manager, request, self.limits, self.budget, self.metrics,
                                                  "grpc", context)
        except InvalidRequest as e:
            context.abort(e.code, str(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.manager.name
        response.model_spec.version.value = version.version
        response.model_spec.signature_name = signature
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        from tensorflow_serving.apis import get_model_metadata_pb2

        try:
            version = self.manager.get(request.model_spec)
        except InvalidRequest as e:
            context.abort(e.code, str(e))
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the one supported")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.manager.name
        response.model_spec.version.value = version.version
        response.metadata["signature_def"].Pack(signature_def_map(version))
        return response


def signature_def_map(version):
    """The ``SignatureDefMap`` of a loaded version (its metadata)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in version.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    return sig_map


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``ModelService`` servicer (GetModelStatus)."""

    def __init__(self, manager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        from tensorflow_serving.apis import get_model_status_pb2

        try:
            version = self.manager.get(request.model_spec)
        except InvalidRequest as e:
            context.abort(e.code, str(e))
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = version.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


def release_memory():
    """Hands freed heap memory back to the system after a request (glibc
    keeps the peaks of large decodes otherwise); a no-op elsewhere."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _LIBC = ctypes.CDLL(None)
except OSError:  # pragma: no cover - platforms without a C library handle
    _LIBC = None

CHANNEL_ARGUMENTS = {
    "grpc.server_handshake_timeout_ms": 10_000,  # a connection that never speaks HTTP/2
    "grpc.max_connection_idle_ms": 300_000,  # five minutes without a call
    "grpc.max_connection_age_ms": 3_600_000,  # then a GOAWAY: clients reconnect
    "grpc.max_connection_age_grace_ms": 300_000,  # for the calls in flight
    "grpc.keepalive_time_ms": 60_000,  # pings find dead peers
    "grpc.keepalive_timeout_ms": 20_000,
}
"""gRPC server arguments by default, so that idle, silent or dead
connections are closed instead of holding file descriptors."""


def channel_arguments(text):
    """``--grpc_channel_arguments`` (``key=value,...``, as TF Serving takes
    it) over `CHANNEL_ARGUMENTS`: a list of ``(key, value)``."""
    merged = dict(CHANNEL_ARGUMENTS)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--grpc_channel_arguments: {item!r} is not key=value")
        value = value.strip()
        merged[key.strip()] = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
    return list(merged.items())


def build_server(manager, port, host="127.0.0.1", max_threads=8, max_message_bytes=256 << 20, limits=LIMITS,
                 budget=None, arguments=None, max_concurrent_rpcs=None, metrics=None):
    """A grpc.Server (not started yet) and the port it bound; a ValueError
    when the port is taken (gRPC's port reuse is off: two servers on one
    port would each answer some of the calls).

    ``arguments``: gRPC server arguments (default `CHANNEL_ARGUMENTS`);
    ``max_concurrent_rpcs``: calls accepted at once, running or queued
    (default four per thread); beyond it a call gets RESOURCE_EXHAUSTED
    at once rather than holding its message in memory."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_threads),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *(arguments if arguments is not None else CHANNEL_ARGUMENTS.items()),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs or 4 * max_threads,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, limits, budget, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # what grpcio raises for a failed bind
        bound = 0
    if not bound:
        raise ValueError(f"cannot listen on {host}:{port}: the port is in use or the address is not this machine's")
    return server, bound
