import base64
import http.client
import json
import shutil

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import client
from serving import service as server_lib
from serving.metrics import Metrics
from serving.model_manager import ModelManager
from serving.rest import RestServer
from tests.helpers_images import encoded


@pytest.fixture(scope="module")
def both(exported, tmp_path_factory):
    """The gRPC and REST endpoints of one embedded server (shared metrics)."""
    base = tmp_path_factory.mktemp("rest") / "deep_retrieval"
    shutil.copytree(exported["version"], base / "1")
    manager = ModelManager("deep_retrieval", str(base), poll_seconds=0)
    metrics = Metrics()
    grpc_server, port = server_lib.build_server(manager, 0, metrics=metrics)
    grpc_server.start()
    rest = RestServer(manager, 0, metrics=metrics, max_body_bytes=4 << 20)
    rest.start()
    yield {"stub": prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}")),
           "rest": rest.port, "grpc": port}
    rest.shutdown()
    grpc_server.stop(0)
    manager.stop()


def _http(port, method, path, body=None, raw=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read()
    connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, (json.loads(text) if kind.startswith("application/json") else text.decode())


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


JPEGS = [encoded(80, 60, 1), encoded(64, 96, 2), encoded(80, 60, 3)]
PREDICT = "/v1/models/deep_retrieval:predict"


def test_rest_answers_equal_grpc(both):
    request = client.predict_request("deep_retrieval", JPEGS)
    expected = client.descriptors(both["stub"].Predict(request))
    status, rows = _http(both["rest"], "POST", PREDICT, {"instances": [_b64(b) for b in JPEGS]})
    assert status == 200
    np.testing.assert_allclose(np.asarray(rows["predictions"], np.float32), expected, atol=1e-5)
    status, columns = _http(both["rest"], "POST", "/v1/models/deep_retrieval/versions/1:predict",
                            {"inputs": {"images": [_b64(b) for b in JPEGS]}})
    assert status == 200
    np.testing.assert_allclose(np.asarray(columns["outputs"], np.float32), expected, atol=1e-5)
    boxes = [[0, 0, 30, 40], [10, 5, 90, 60], [5, 5, 55, 75]]
    grpc_crops = client.descriptors(both["stub"].Predict(
        client.predict_request("deep_retrieval", JPEGS, "crops", boxes)))
    status, crops = _http(both["rest"], "POST", PREDICT, {
        "signature_name": "crops", "instances": [{"images": _b64(b), "boxes": box} for b, box in zip(JPEGS, boxes)]})
    assert status == 200
    np.testing.assert_allclose(np.asarray(crops["predictions"], np.float32), grpc_crops, atol=1e-5)


def test_status_and_metadata(both):
    status, body = _http(both["rest"], "GET", "/v1/models/deep_retrieval")
    assert status == 200
    assert body["model_version_status"] == [{"version": "1", "state": "AVAILABLE",
                                             "status": {"error_code": "OK", "error_message": ""}}]
    status, meta = _http(both["rest"], "GET", "/v1/models/deep_retrieval/versions/1/metadata")
    signatures = meta["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and {"serving_default", "crops"} <= set(signatures)
    assert signatures["serving_default"]["inputs"]["images"]["dtype"] == "DT_STRING"
    assert _http(both["rest"], "GET", "/v1/models/other")[0] == 404
    assert _http(both["rest"], "GET", "/v1/models/deep_retrieval/versions/7")[0] == 404


@pytest.mark.parametrize("raw, code, words", [
    (b"{not json", 400, "not JSON"),
    (json.dumps({"instances": []}).encode(), 400, "non-empty"),
    (json.dumps({"instances": [{"b64": "@@@"}]}).encode(), 400, "base64"),
    (json.dumps({"instances": [_b64(b"not an image")]}).encode(), 400, "cannot decode image"),
    (json.dumps({"instances": [_b64(JPEGS[0])], "inputs": {}}).encode(), 400, "one of"),
    (json.dumps({"signature_name": "nope", "instances": [_b64(JPEGS[0])]}).encode(), 400, "not found"),
    (json.dumps({"instances": [[1, 2], [3]]}).encode(), 400, "input images"),
    (json.dumps({"instances": [_b64(JPEGS[0])] * 300}).encode(), 429, "at most 256"),
])
def test_malformed_bodies_get_errors_and_the_server_keeps_serving(both, raw, code, words):
    status, body = _http(both["rest"], "POST", PREDICT, raw=raw)
    assert status == code and words in body["error"], body
    status, ok = _http(both["rest"], "POST", PREDICT, {"instances": [_b64(JPEGS[0])]})
    assert status == 200 and len(ok["predictions"]) == 1


def test_unknown_paths_oversized_bodies_and_other_methods(both):
    assert _http(both["rest"], "POST", "/v1/models/nope:predict", {"instances": [_b64(JPEGS[0])]})[0] == 404
    assert _http(both["rest"], "POST", "/v1/models/deep_retrieval:classify", {"instances": []})[0] == 400
    assert _http(both["rest"], "GET", "/elsewhere")[0] == 404
    connection = http.client.HTTPConnection("127.0.0.1", both["rest"], timeout=60)
    connection.putrequest("POST", PREDICT)
    connection.putheader("Content-Length", str(5 << 20))  # refused before the body is read
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]
    connection.close()


def test_prometheus_metrics_count_requests_errors_and_latency(both):
    before = _http(both["rest"], "GET", "/monitoring/prometheus/metrics")[1]
    _http(both["rest"], "POST", PREDICT, {"instances": [_b64(JPEGS[0])]})
    _http(both["rest"], "POST", PREDICT, {"instances": [_b64(b"junk")]})
    both["stub"].Predict(client.predict_request("deep_retrieval", JPEGS[:1]))
    text = _http(both["rest"], "GET", "/monitoring/prometheus/metrics")[1]

    def value(text, line_start):
        found = [line for line in text.splitlines() if line.startswith(line_start)]
        return float(found[0].rsplit(" ", 1)[1]) if found else 0.0

    labels = 'model_name="deep_retrieval",signature_name="serving_default",entrypoint="{}"'
    rest_ok = "deep_retrieval_requests_total{" + labels.format("rest") + ',status="OK"}'
    rest_bad = "deep_retrieval_requests_total{" + labels.format("rest") + ',status="INVALID_ARGUMENT"}'
    grpc_ok = "deep_retrieval_requests_total{" + labels.format("grpc") + ',status="OK"}'
    assert value(text, rest_ok) == value(before, rest_ok) + 1
    assert value(text, rest_bad) == value(before, rest_bad) + 1
    assert value(text, grpc_ok) == value(before, grpc_ok) + 1
    errors = "deep_retrieval_request_errors_total{" + labels.format("rest") + "}"
    assert value(text, errors) == value(before, errors) + 1
    count = "deep_retrieval_request_latency_seconds_count{" + labels.format("rest") + "}"
    inf = "deep_retrieval_request_latency_seconds_bucket{" + labels.format("rest") + ',le="+Inf"}'
    assert value(text, count) == value(text, inf) == value(before, count) + 2
    assert value(text, "deep_retrieval_request_latency_seconds_sum{" + labels.format("rest") + "}") > 0


def test_metrics_histogram_by_hand():
    metrics = Metrics()
    for seconds in (0.003, 0.2, 0.2, 7.0, 100.0):
        metrics.record("m", "serving_default", "grpc", "OK", seconds)
    metrics.record("m", "crops", "rest", "NOT_FOUND", 0.01)
    lines = dict(line.rsplit(" ", 1) for line in metrics.render().splitlines() if not line.startswith("#"))
    key = 'model_name="m",signature_name="serving_default",entrypoint="grpc"'
    assert lines["deep_retrieval_request_latency_seconds_bucket{" + key + ',le="0.005"}'] == "1"
    assert lines["deep_retrieval_request_latency_seconds_bucket{" + key + ',le="0.25"}'] == "3"
    assert lines["deep_retrieval_request_latency_seconds_bucket{" + key + ',le="10.0"}'] == "4"
    assert lines["deep_retrieval_request_latency_seconds_bucket{" + key + ',le="+Inf"}'] == "5"
    assert float(lines["deep_retrieval_request_latency_seconds_sum{" + key + "}"]) == pytest.approx(107.403)
    crops = 'model_name="m",signature_name="crops",entrypoint="rest"'
    assert lines["deep_retrieval_request_errors_total{" + crops + "}"] == "1"
    assert lines["deep_retrieval_request_errors_total{" + key + "}"] == "0"


def test_a_port_in_use_is_refused(both, exported, tmp_path):
    base = tmp_path / "deep_retrieval"
    shutil.copytree(exported["version"], base / "1")
    manager = ModelManager("deep_retrieval", str(base), poll_seconds=0)
    try:
        with pytest.raises(ValueError, match="in use"):
            server_lib.build_server(manager, both["grpc"])
        with pytest.raises(ValueError, match="cannot listen"):
            RestServer(manager, both["rest"])
    finally:
        manager.stop()


def _raw_post(port, body, length=None, headers=(), timeout=30):
    """POSTs ``body`` with a ``Content-Length`` of ``length`` (default: the body's)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.putrequest("POST", PREDICT)
    connection.putheader("Content-Length", str(len(body)) if length is None else length)
    for key, value in headers:
        connection.putheader(key, value)
    connection.endheaders()
    if body:
        connection.send(body)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def _max_rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def roomy(exported, tmp_path_factory):
    """A REST endpoint with TF Serving-sized bodies (64 MiB) and one prediction slot."""
    base = tmp_path_factory.mktemp("roomy") / "deep_retrieval"
    shutil.copytree(exported["version"], base / "1")
    manager = ModelManager("deep_retrieval", str(base), poll_seconds=0)
    rest = RestServer(manager, 0, max_body_bytes=64 << 20, max_concurrent=1)
    rest.start()
    yield rest
    rest.shutdown()
    manager.stop()


def test_a_body_of_empty_lists_is_refused_before_it_is_parsed(roomy):
    # 16 MiB of [] parsed into 5.6M lists cost about 1 GB and 18 s before the 256-image cap answered.
    body = b'{"instances":[' + b"[]," * ((16 << 20) // 3) + b"[]]}"
    before = _max_rss_mib()
    status, answer = _raw_post(roomy.port, body)
    assert status == 429 and "JSON lists and objects, at most 1048576" in answer["error"]
    assert _max_rss_mib() - before < 200  # the body itself (16 MiB), never its objects
    status, ok = _raw_post(roomy.port, json.dumps({"instances": [_b64(JPEGS[0])]}).encode())
    assert status == 200 and len(ok["predictions"]) == 1


@pytest.mark.parametrize("body, words", [
    (b'{"instances":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (json.dumps({"signature_name": "pixels", "instances": [[[[300, 0, 0]]]]}).encode(), "out of range for uint8"),
    (json.dumps({"signature_name": "pixels", "instances": [[[[-1, 0, 0]]]]}).encode(), "out of range for uint8"),
    (b'{"signature_name": "pixels", "instances": [[[[1e300, 0, 0]]]]}', "out of range for uint8"),
    (b'{"signature_name": "pixels", "instances": [[[[1.5, 0, 0]]]]}', "whole numbers"),
    (json.dumps({"signature_name": "crops", "instances": [{"images": _b64(JPEGS[0]), "boxes": [0, 0, 1e39, 9]}]})
     .encode(), "out of range for float32"),
], ids=["nesting", "300", "-1", "1e300", "fraction", "box-overflow"])
def test_values_the_json_cannot_hold_get_400(both, body, words):
    # These closed the connection with no status and a 140 KB traceback in the log.
    status, answer = _raw_post(both["rest"], body)
    assert status == 400 and words in answer["error"], answer


def test_a_content_length_that_is_not_ascii_digits_gets_400_and_is_counted(both):
    def errors():
        text = _http(both["rest"], "GET", "/monitoring/prometheus/metrics")[1]
        key = 'deep_retrieval_requests_total{model_name="deep_retrieval",signature_name="(unknown)",' \
              'entrypoint="rest",status="INVALID_ARGUMENT"}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))

    before = errors()
    status, answer = _raw_post(both["rest"], b"", length="\u00b2")  # '²'.isdigit() is True
    assert status == 400 and "is not a number of bytes" in answer["error"]
    assert errors() == before + 1


def test_a_full_server_refuses_before_reading_the_body(roomy):
    assert roomy.slots.acquire(blocking=False)  # the one prediction slot is busy
    try:
        # A declared 32 MiB that never comes: the old server read (and waited for) it before refusing.
        status, answer = _raw_post(roomy.port, b"", length=str(32 << 20), timeout=10)
        assert status == 429 and "limit of concurrent requests" in answer["error"]
    finally:
        roomy.slots.release()


def test_an_internal_failure_answers_500_and_logs_one_line(both, monkeypatch, capfd):
    from serving import rest

    def broken(*args):
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(rest, "predict_request", broken)
    capfd.readouterr()
    status, answer = _raw_post(both["rest"], json.dumps({"instances": [_b64(JPEGS[0])]}).encode())
    assert status == 500 and "internal error" in answer["error"]
    log = capfd.readouterr().err.strip().splitlines()
    assert log == ["REST: POST /v1/models/deep_retrieval:predict: RuntimeError: boom with a second line"]


BAD_BOXES = {  # for the 60x80 (width x height) JPEGS[0]
    "reversed": [50, 40, 10, 5], "empty": [10, 10, 10, 30], "sub-pixel": [10.2, 10.2, 10.4, 10.4],
    "outside": [100, 100, 160, 160], "huge": [0, 0, 1e30, 1e30], "nan": [0, 0, float("nan"), 10],
}


@pytest.mark.parametrize("box", BAD_BOXES.values(), ids=BAD_BOXES.keys())
def test_degenerate_crop_boxes_are_refused_on_grpc_and_rest(both, box):
    # Each answered 200 with a descriptor: a constant one, or silently the full image's.
    request = client.predict_request("deep_retrieval", JPEGS[:1], "crops", [box])
    with pytest.raises(grpc.RpcError) as info:
        both["stub"].Predict(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "boxes[0]: box " in info.value.details()
    body = json.dumps({"signature_name": "crops", "instances": [{"images": _b64(JPEGS[0]), "boxes": box}]})
    status, answer = _raw_post(both["rest"], body.encode())
    assert status == 400 and ("boxes[0]: box " in answer["error"] or "out of range" in answer["error"]), answer
    good = client.predict_request("deep_retrieval", JPEGS[:1], "crops", [[0, 0, 60, 80]])  # the whole image
    assert client.descriptors(both["stub"].Predict(good)).shape[0] == 1
