"""An embedded server speaking TensorFlow Serving's protocols: gRPC, and
REST with ``--rest_api_port`` (`serving.rest`).

For machines where the ``tensorflow_model_server`` binary is not available:
it implements ``PredictionService.Predict``, ``PredictionService.GetModelMetadata``
and ``ModelService.GetModelStatus`` with the protos of
``tensorflow-serving-api``, so clients written against it work unchanged with
the real server. It serves the newest numeric version under
``--model_base_path`` and picks up a newer version dropped in while running.

    python -m serving.server --port 8500 --model_name deep_retrieval \
        --model_base_path models/deep_retrieval

Bad requests get TF Serving's codes: an unknown model or version is
NOT_FOUND; an unknown signature or input, a wrong dtype or shape, an empty
batch or an undecodable image (named by its position in the batch) is
INVALID_ARGUMENT. The server keeps serving.

Requests are checked before any work, from the protobuf alone: a tensor
must hold exactly the elements its shape declares (TF's own decoder would
repeat the last value to fill any declared shape, so a 1 KB request could
ask for thousands of images), no dimension may be negative, a batch holds
at most ``--max_images_per_request`` images, and the pixels the batch
declares (image headers for encoded images, the shape for ``pixels``) stay
within ``--max_request_pixels`` (RESOURCE_EXHAUSTED otherwise).

Then the batch runs in chunks of `CHUNK_PIXELS` under a process-wide
memory budget (``--max_pixels_in_flight``): concurrent requests wait their
turn rather than overcommit, and a request whose client cancelled it or
whose deadline passed stops before its next chunk. Idle, silent and dead
connections are closed (`CHANNEL_ARGUMENTS`), and at most
``--max_concurrent_rpcs`` calls are held at once.
"""

import concurrent.futures
import contextlib
import ctypes
import logging
import re
import signal
import sys
import threading
import time

import grpc
from absl import app, flags
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from deep_retrieval import cli
from deep_retrieval.data.images import decode
from serving.metrics import Metrics
from serving.model_manager import ModelManager
from serving.requests import (
    LIMITS,
    InvalidRequest,
    Limits,
    PixelBudget,
    bounded,
    check_alive,
    check_pixels,
    check_proto,
    chunks,
)

FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS):
    """Defines the command-line flags (only when run as a program)."""
    from serving.metrics import PATH as metrics_path

    fv = {"flag_values": flag_values}
    flags.DEFINE_integer("port", 8500, "gRPC port.", **fv)
    flags.DEFINE_integer("rest_api_port", 0, "Port of TF Serving's REST API and the Prometheus metrics "
                         f"({metrics_path}), on --host (0: no REST).", **fv)
    flags.DEFINE_integer("rest_api_num_threads", 16, "REST predictions running at once; more get 429.", **fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the server on every interface.", **fv)
    flags.DEFINE_string("model_name", "deep_retrieval", "Name clients use in ModelSpec.name.", **fv)
    flags.DEFINE_string("model_base_path", None, "Folder holding numeric version subfolders (SavedModels).", **fv)
    flags.DEFINE_integer("file_system_poll_wait_seconds", 1, "Seconds between checks for a new version "
                         "(0: never).", **fv)
    flags.DEFINE_integer("grpc_max_threads", 8, "Requests served concurrently.", **fv)
    flags.DEFINE_integer("max_message_bytes", 256 << 20, "Largest request or response message accepted.", **fv)
    flags.DEFINE_integer("max_images_per_request", LIMITS.images, "Images one request may hold.", **fv)
    flags.DEFINE_integer("max_request_pixels", LIMITS.pixels, "Pixels the images of one request may declare "
                         "in all (each image is also capped at deep_retrieval.data.MAX_PIXELS).", **fv)
    flags.DEFINE_integer("max_pixels_in_flight", LIMITS.pixels, "Declared pixels all requests together may "
                         "decode at once (about 16 bytes of memory each); requests beyond it wait their turn.", **fv)
    flags.DEFINE_integer("max_concurrent_rpcs", None, "Calls accepted at once, running or waiting (default: "
                         "4 x --grpc_max_threads); more get RESOURCE_EXHAUSTED.", **fv)
    flags.DEFINE_string("grpc_channel_arguments", "", "Comma-separated gRPC server arguments, key=value, over "
                        "the defaults in serving.server.CHANNEL_ARGUMENTS (idle, age and handshake timeouts).", **fv)


log = logging.getLogger("serving.server")


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


def _raise_file_limit():
    """Lifts the soft open-file limit to the hard one: each client connection
    holds a descriptor (1,024 by default on Linux)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("open-file limit stays at %d", soft)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _raise_file_limit()
    if not FLAGS.model_base_path:
        raise app.UsageError("--model_base_path is required")
    try:
        manager = ModelManager(FLAGS.model_name, FLAGS.model_base_path, FLAGS.file_system_poll_wait_seconds)
        limits = Limits(FLAGS.max_images_per_request, FLAGS.max_request_pixels)
        budget = PixelBudget(FLAGS.max_pixels_in_flight)
        metrics = Metrics()
        server, port = build_server(manager, FLAGS.port, FLAGS.host, FLAGS.grpc_max_threads,
                                    FLAGS.max_message_bytes, limits, budget,
                                    channel_arguments(FLAGS.grpc_channel_arguments), FLAGS.max_concurrent_rpcs,
                                    metrics)
        rest = None
        if FLAGS.rest_api_port:
            from serving.rest import RestServer

            rest = RestServer(manager, FLAGS.rest_api_port, FLAGS.host, limits, budget, metrics,
                              FLAGS.max_message_bytes, FLAGS.rest_api_num_threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server.start()
    log.info("gRPC PredictionService for %r on %s:%d", FLAGS.model_name, FLAGS.host, port)
    if rest is not None:
        rest.start()
        log.info("REST API on http://%s:%d/v1/models/%s, metrics at %s", FLAGS.host, rest.port, FLAGS.model_name,
                 "/monitoring/prometheus/metrics")
    # SIGTERM (docker stop, Kubernetes) drains like Ctrl-C: new requests are
    # refused, those in flight get 30 s to finish, then exit 0.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("stopping: draining requests in flight")
    if rest is not None:
        rest.shutdown()
    server.stop(grace=30).wait()
    manager.stop()
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
