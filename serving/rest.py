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
or version, 413 for an oversized body and 429 when the server is full;
every one is counted in the metrics.

A body costs memory before any image cap can see it: a prediction slot and
the body's bytes (``max_bytes_in_flight`` for all requests together) are
taken before it is read, and its JSON structure is counted on the raw
bytes before it is parsed (`MAX_JSON_CONTAINERS`, `MAX_JSON_VALUES`), so
that a body of empty lists cannot grow into gigabytes of objects.
"""

import base64
import json
import re
import threading

import grpc
import numpy as np

from serving import httpd
from serving import metrics as metrics_lib
from serving.requests import LIMITS, InvalidRequest, PixelBudget, bounded

MAX_JSON_CONTAINERS = 1 << 20
"""Lists and objects one body may hold (an image as nested lists holds
one per pixel row: send encoded images as ``{"b64": ...}`` instead)."""

MAX_JSON_VALUES = 1 << 24
"""Values one body may hold (about 16 MB of pixels as JSON numbers)."""

_MODEL = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
                    r"(?:/labels/(?P<label>[^/:]+))?(?P<rest>/metadata|:[a-z]+)?$")

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503}


def check_json(raw):
    """Refuses a body whose JSON would hold more containers or values than
    `MAX_JSON_CONTAINERS` and `MAX_JSON_VALUES`, counted on the raw bytes
    (brackets and commas inside strings count too: a bound, not a parse)."""
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise InvalidRequest(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the body holds {containers} JSON lists and objects, at most {MAX_JSON_CONTAINERS} "
                             '(send images encoded, as {"b64": ...})')
    values = raw.count(b",") + 1
    if values > MAX_JSON_VALUES:
        raise InvalidRequest(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the body holds about {values} JSON values, at most {MAX_JSON_VALUES}")


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
            array = _numbers(value, spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: {bounded(e, 300)}") from None
    if array.dtype == object and any(isinstance(v, list) for v in array.reshape(-1)):
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: ragged lists")
    return array


def _numbers(value, dtype):
    """JSON numbers as ``dtype``, refused (ValueError) unless each is finite
    and, for an integer type, a whole number in its range."""
    dtype = np.dtype(dtype)
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise ValueError("expected numbers of one shape (ragged lists or other values)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("values out of range (infinite or too large)")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"values out of range for {dtype.name} ({info.min} to {info.max}), "
                             f"got {array.min()} to {array.max()}")
        if array.dtype.kind == "f" and not (array == np.floor(array)).all():
            raise ValueError(f"{dtype.name} values are whole numbers")
    elif dtype.kind == "f" and array.size and np.abs(array).max() > np.finfo(dtype).max:
        raise ValueError(f"values out of range for {dtype.name}")
    return array.astype(dtype)


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


class Handler(httpd.Handler):
    """One HTTP request (see the module docstring); state is on ``server``."""

    server_version = "deep-retrieval"

    def _error(self, code, message):
        self.send_json(code, {"error": message})

    def _count(self, status):
        """Records a request refused before it reached `serving.service.predict`."""
        self.server.metrics.record(self.server.manager.name, "(unknown)", "rest", status, 0.0)

    def refusing(self, code):
        self._count({413: "RESOURCE_EXHAUSTED", 408: "DEADLINE_EXCEEDED"}.get(code, "INVALID_ARGUMENT"))

    def _refuse(self, code, status, message):
        """An error answered before the request reached `serving.service.predict`, counted."""
        self._count(status)
        self._error(code, message)

    def get(self):
        app = self.server
        if self.path == metrics_lib.PATH:
            return self.send(200, app.metrics.render().encode(), "text/plain; version=0.0.4")
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
        self.send_json(200, _metadata(app.manager, version) if match["rest"] else _status(version))

    def post(self):
        app = self.server
        match = _MODEL.match(self.path)
        if not match or match["rest"] is None or not match["rest"].startswith(":"):
            return self._error(404, f"no such resource: {bounded(self.path)}")
        if match["rest"] != ":predict":
            return self._error(400, f"{bounded(match['rest'][1:])}: only predict is served (descriptors)")
        length = self.content_length(app.max_body_bytes)
        if length is None:  # answered and counted
            return
        if not app.slots.acquire(blocking=False):  # before the body is read: a full server holds no more bodies
            self.close_connection = True
            return self._refuse(429, "RESOURCE_EXHAUSTED",
                                "the server is at its limit of concurrent requests; retry later")
        try:
            if not app.bodies.hold(length):
                self.close_connection = True
                return self._refuse(429, "RESOURCE_EXHAUSTED", f"the server holds {app.bodies.used} bytes of "
                                    f"request bodies, at most {app.bodies.capacity}; retry later")
            try:
                self._predict(app, match, length)
            finally:
                app.bodies.release(length)
        finally:
            app.slots.release()

    def _predict(self, app, match, length):
        from serving.service import predict

        raw = self.read_body(length)
        if raw is None:  # answered and counted
            return
        try:
            try:
                check_json(raw)
                body = json.loads(raw)
                del raw
                request, rows = predict_request(app.manager, match["name"], match["version"], match["label"],
                                                body)
                del body
            except (ValueError, UnicodeDecodeError, RecursionError, InvalidRequest) as e:  # predict never saw it
                self._count(getattr(e, "code", grpc.StatusCode.INVALID_ARGUMENT).name)
                if isinstance(e, InvalidRequest):
                    raise
                if isinstance(e, RecursionError):
                    raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, "the body's JSON is nested too deeply")
                raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {bounded(e)}") from None
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
        self.send_json(200, payload)


class RestServer(httpd.Server):
    """The REST endpoint: a thread per connection (`serving.httpd.Server`),
    at most ``max_concurrent`` predictions running at once.

    Args:
        manager: the `serving.model_manager.ModelManager` (shared with gRPC).
        port, host: where to listen (loopback by default; port 0 picks one).
        limits, budget, metrics: shared with the gRPC server.
        max_body_bytes: largest request body read.
        max_concurrent: predictions at once; more get 429.
        max_bytes_in_flight: request bodies all requests may hold at once;
            more get 429.
        allowed_hosts: ``Host`` names answered (`serving.httpd`).
    """

    def __init__(self, manager, port, host="127.0.0.1", limits=LIMITS, budget=None, metrics=None,
                 max_body_bytes=256 << 20, max_concurrent=32, max_bytes_in_flight=1 << 30, allowed_hosts=None):
        self.manager, self.limits = manager, limits
        self.budget = budget or PixelBudget(LIMITS.pixels)
        self.metrics = metrics or metrics_lib.Metrics()
        self.max_body_bytes = int(max_body_bytes)
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.bodies = httpd.ByteBudget(max(max_bytes_in_flight, max_body_bytes))
        super().__init__((host, port), Handler, "REST", max_connections=max(64, 2 * max_concurrent),
                         allowed_hosts=allowed_hosts)
