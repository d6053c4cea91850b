"""TensorFlow Serving's REST API on the embedded server (``--rest_api_port``).

    POST /v1/models/NAME[/versions/N]:predict   {"instances": [...]} or {"inputs": ...}
    GET  /v1/models/NAME[/versions/N]           the version's status
    GET  /v1/models/NAME[/versions/N]/metadata  its signatures
    GET  /monitoring/prometheus/metrics         requests, errors, latency (`serving.metrics`)

As in TF Serving, ``instances`` is the row format (one value per image, or
one ``{input: value}`` object per image when the signature takes several
inputs) and answers ``predictions``; ``inputs`` is the columnar format and
answers ``outputs``. Binary strings (encoded images) travel as
``{"b64": "..."}``. A request becomes the same ``PredictRequest`` as on
gRPC and runs through `serving.service.predict`, so it gets the same checks,
request caps, pixel limits and memory budget. Errors answer
``{"error": "..."}``, with 400 for a bad request, 404 for an unknown model
or version, 413 for an oversized body and 429 when the server is full.
"""

import base64
import http.server
import json
import re
import threading

import grpc
import numpy as np

from serving import metrics as metrics_lib
from serving.requests import LIMITS, InvalidRequest, PixelBudget, bounded

_MODEL = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
                    r"(?:/labels/(?P<label>[^/:]+))?(?P<rest>/metadata|:[a-z]+)?$")

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503}


def _strings(value, key):
    """JSON for a string tensor: ``{"b64": ...}`` and plain strings to bytes."""
    if isinstance(value, list):
        return [_strings(v, key) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                 f'input {key}: a binary value is {{"b64": "<base64 string>"}}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as e:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: bad base64: {e}") from None
    if isinstance(value, str):
        return value.encode()
    raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: expected strings, got {bounded(value, 60)}")


def _array(key, value, spec):
    """A JSON value as the numpy array of the signature input ``spec``."""
    try:
        if spec.dtype.name == "string":
            array = np.array(_strings(value, key), dtype=object)
        else:
            if not isinstance(value, (list, int, float)) or isinstance(value, bool):
                raise ValueError(f"expected numbers, got {type(value).__name__}")
            array = np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: {bounded(e, 300)}") from None
    if array.dtype == object and any(isinstance(v, list) for v in array.reshape(-1)):
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: ragged lists")
    return array


def _columns(body, specs):
    """``({input: JSON value for the whole batch}, row format?)``."""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             'the body is a JSON object with one of "instances" (rows) or "inputs" (columns)')
    names = sorted(specs)
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, '"instances" is a non-empty list')
        if all(isinstance(r, dict) and "b64" not in r for r in rows):
            for r in rows:
                if set(r) != set(names):
                    raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                         f"each instance needs the inputs {names}, got {bounded(sorted(r))}")
            return {k: [r[k] for r in rows] for k in names}, True
        if len(names) != 1:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the signature takes {names}: give each instance as an object of them")
        return {names[0]: rows}, True
    inputs = body["inputs"]
    if isinstance(inputs, dict) and "b64" not in inputs:
        return inputs, False
    if len(names) != 1:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the signature takes {names}: give \"inputs\" as an object of them")
    return {names[0]: inputs}, False


def _json(array):
    if array.dtype == object:
        return [_json(v) for v in array] if array.ndim else {"b64": base64.b64encode(array.item()).decode()}
    return array.tolist()


def predict_request(manager, name, version, label, body):
    """The ``PredictRequest`` a REST predict body stands for, and whether it
    used the row format."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version:
        request.model_spec.version.value = int(version)
    if label:
        request.model_spec.version_label = label
    signature = body.get("signature_name", "serving_default") if isinstance(body, dict) else "serving_default"
    if not isinstance(signature, str):
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, '"signature_name" is a string')
    request.model_spec.signature_name = signature
    loaded = manager.get(request.model_spec)
    if signature not in loaded.functions:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f'Serving signature key "{bounded(signature)}" not found.')
    specs = loaded.functions[signature].structured_input_signature[1]
    columns, rows = _columns(body, specs)
    for key, value in columns.items():
        if key not in specs:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input tensor alias not found: {bounded(key)}")
        request.inputs[key].CopyFrom(tf.make_tensor_proto(_array(key, value, specs[key]), dtype=specs[key].dtype))
    return request, rows


def _status(version):
    return {"model_version_status": [{"version": str(version.version), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


def _metadata(manager, version):
    from google.protobuf import json_format

    from serving.service import signature_def_map

    return {"model_spec": {"name": manager.name, "signature_name": "", "version": str(version.version)},
            "metadata": {"signature_def": json_format.MessageToDict(signature_def_map(version),
                                                                    preserving_proto_field_name=True)}}


class Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP request (see the module docstring); state is on ``server``."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending is dropped
    server_version = "deep-retrieval"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _send(self, code, payload, content_type="application/json"):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code, message):
        self._send(code, {"error": message})

    def do_GET(self):
        app = self.server
        if self.path == metrics_lib.PATH:
            return self._send(200, app.metrics.render().encode(), "text/plain; version=0.0.4")
        match = _MODEL.match(self.path)
        if not match or match["rest"] not in (None, "/metadata"):
            return self._error(404, f"no such resource: {bounded(self.path)}")
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=match["name"])
        if match["version"]:
            spec.version.value = int(match["version"])
        if match["label"]:
            spec.version_label = match["label"]
        try:
            version = app.manager.get(spec)
        except InvalidRequest as e:
            return self._error(HTTP_STATUS.get(e.code.name, 500), str(e))
        self._send(200, _metadata(app.manager, version) if match["rest"] else _status(version))

    def do_POST(self):
        app = self.server
        match = _MODEL.match(self.path)
        if not match or match["rest"] is None or not match["rest"].startswith(":"):
            return self._error(404, f"no such resource: {bounded(self.path)}")
        if match["rest"] != ":predict":
            return self._error(400, f"{bounded(match['rest'][1:])}: only predict is served (descriptors)")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(411, "a Content-Length is required")
        if int(length) > app.max_body_bytes:
            self.close_connection = True  # the body is not read
            return self._error(413, f"the body has {length} bytes, at most {app.max_body_bytes}")
        raw = self.rfile.read(int(length))
        if not app.slots.acquire(blocking=False):
            return self._error(429, "the server is at its limit of concurrent requests; retry later")
        try:
            self._predict(app, match, raw)
        finally:
            app.slots.release()

    def _predict(self, app, match, raw):
        from serving.service import predict

        try:
            try:
                body = json.loads(raw)
                request, rows = predict_request(app.manager, match["name"], match["version"], match["label"],
                                                body)
            except (ValueError, UnicodeDecodeError, InvalidRequest) as e:  # counted here: predict never saw it
                app.metrics.record(app.manager.name, "(unknown)", "rest", getattr(e, "code", grpc.StatusCode
                                                                                  .INVALID_ARGUMENT).name, 0.0)
                if isinstance(e, InvalidRequest):
                    raise
                raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {e}") from None
            _, _, outputs = predict(app.manager, request, app.limits, app.budget, app.metrics, "rest")
        except InvalidRequest as e:
            return self._error(HTTP_STATUS.get(e.code.name, 500), str(e))
        if rows:
            keys = list(outputs)
            count = len(next(iter(outputs.values())))
            if len(keys) == 1:
                payload = {"predictions": _json(outputs[keys[0]])}
            else:
                payload = {"predictions": [{k: _json(outputs[k][i]) for k in keys} for i in range(count)]}
        else:
            payload = {"outputs": _json(next(iter(outputs.values()))) if len(outputs) == 1
                       else {k: _json(v) for k, v in outputs.items()}}
        self._send(200, payload)


class RestServer(http.server.ThreadingHTTPServer):
    """The REST endpoint: a thread per connection, at most
    ``max_concurrent`` predictions running at once.

    Args:
        manager: the `serving.model_manager.ModelManager` (shared with gRPC).
        port, host: where to listen (loopback by default; port 0 picks one).
        limits, budget, metrics: shared with the gRPC server.
        max_body_bytes: largest request body read.
        max_concurrent: predictions at once; more get 429.
    """

    daemon_threads = True
    allow_reuse_address = False  # a port in use is refused, never shared

    def __init__(self, manager, port, host="127.0.0.1", limits=LIMITS, budget=None, metrics=None,
                 max_body_bytes=256 << 20, max_concurrent=32):
        self.manager, self.limits = manager, limits
        self.budget = budget or PixelBudget(LIMITS.pixels)
        self.metrics = metrics or metrics_lib.Metrics()
        self.max_body_bytes = int(max_body_bytes)
        self.slots = threading.BoundedSemaphore(max_concurrent)
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} for REST: {e.strerror or e}") from None

    @property
    def port(self):
        return self.server_address[1]

    def start(self):
        """Serves in a background thread."""
        threading.Thread(target=self.serve_forever, name="rest", daemon=True).start()
