import shutil
import socket
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import requests as requests_lib
from serving import service as server_lib
from serving.model_manager import ModelManager
from serving.requests import Limits
from tests.helpers_images import (
    encoded,
    gif_frames_bomb,
    jpeg_declaring,
    reference_descriptors,
    webp_declaring,
)


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    base = tmp_path_factory.mktemp("served") / "deep_retrieval"
    shutil.copytree(exported["version"], base / "1")
    manager = ModelManager("deep_retrieval", str(base), poll_seconds=1)
    server, port = server_lib.build_server(manager, 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"stub": prediction_service_pb2_grpc.PredictionServiceStub(channel),
           "models": model_service_pb2_grpc.ModelServiceStub(channel),
           "base": base, "port": port, "exported": exported}
    server.stop(0)
    manager.stop()


def _request(blobs=None, name="deep_retrieval", signature="", tensor=None, key="images"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature:
        request.model_spec.signature_name = signature
    if tensor is None:
        tensor = tf.make_tensor_proto(blobs, dtype=tf.string, shape=[len(blobs)])
    request.inputs[key].CopyFrom(tensor)
    return request


def _code(stub, request):
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request)
    return info.value.code(), info.value.details()


def test_predict_matches_in_process_model(served):
    blobs = [encoded(70, 110, 1), encoded(130, 60, 2, "PNG"), encoded(50, 50, 3, "GIF")]
    response = served["stub"].Predict(_request(blobs))
    out = tf.make_ndarray(response.outputs["descriptors"])
    want = reference_descriptors(served["exported"]["model"], blobs, served["exported"]["image_size"])
    assert np.abs(out - want).max() <= 1e-5
    assert response.model_spec.version.value >= 1


def test_crops_through_the_extraction_client(served):
    from serving import batch_client

    blobs, boxes = [encoded(90, 120, 4), encoded(64, 64, 5)], [[5, 10, 65, 80], [0, 0, 64, 64]]
    replicas = batch_client.Replicas([f"127.0.0.1:{served['port']}"], 64 << 20)
    out = batch_client.Extractor(replicas, "deep_retrieval", "crops", 60, 2).predict(blobs, boxes)
    want = reference_descriptors(served["exported"]["model"], blobs, served["exported"]["image_size"], boxes)
    assert np.abs(out - want).max() <= 1e-5


def test_metadata_and_status(served):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "deep_retrieval"
    request.metadata_field.append("signature_def")
    response = served["stub"].GetModelMetadata(request)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigs)
    assert set(sigs.signature_def) == {"serving_default", "crops", "pixels"}
    assert sigs.signature_def["serving_default"].inputs["images"].dtype == tf.string.as_datatype_enum
    status = served["models"].GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=request.model_spec)
    )
    assert status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_bad_requests_get_tf_serving_codes_and_server_keeps_serving(served):
    stub = served["stub"]
    good = [encoded(40, 40, 9)]
    assert _code(stub, _request(good, name="other"))[0] == grpc.StatusCode.NOT_FOUND
    versioned = _request(good)
    versioned.model_spec.version.value = 99
    assert _code(stub, versioned)[0] == grpc.StatusCode.NOT_FOUND
    code, details = _code(stub, _request(good, signature="nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details
    code, details = _code(stub, _request(good, key="pictures"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pictures" in details
    code, details = _code(stub, _request(tensor=tf.make_tensor_proto(np.zeros(2, np.float32))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "string" in details
    code, details = _code(stub, _request(tensor=tf.make_tensor_proto([[b"a", b"b"]])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in details
    code, details = _code(stub, _request([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in details
    code, details = _code(stub, _request(good + [b"not an image", encoded(30, 30)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "images[1]: cannot decode image" in details
    assert stub.Predict(_request(good)).outputs["descriptors"].tensor_shape.dim[0].size == 1


def test_new_version_is_picked_up_without_restart(served):
    shutil.copytree(served["base"] / "1", served["base"] / "7")
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "deep_retrieval"
    deadline = time.time() + 120
    while time.time() < deadline:
        version = served["models"].GetModelStatus(request).model_version_status[0].version
        if version == 7:
            break
        time.sleep(0.5)
    assert version == 7
    response = served["stub"].Predict(_request([encoded(40, 40)]))
    assert response.model_spec.version.value == 7


def test_hostile_requests_are_refused_before_any_work(served):
    stub = served["stub"]
    start = time.time()
    # One small JPEG in a string tensor declaring 5000 elements (TF would repeat it).
    amplified = tf.make_tensor_proto([encoded(48, 64, 1)], dtype=tf.string, shape=[1])
    amplified.tensor_shape.dim[0].size = 5000
    code, details = _code(stub, _request(tensor=amplified))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declares 5000 elements, the tensor holds 1" in details
    # A pixels request declaring 1x12000x12000x3 with no content (60 bytes on the wire).
    empty = tf.make_tensor_proto(np.zeros((1, 1, 1, 3), np.uint8))
    empty.tensor_content = b""
    for d, size in zip(empty.tensor_shape.dim, (1, 12000, 12000, 3)):
        d.size = size
    code, details = _code(stub, _request(signature="pixels", tensor=empty))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declares 432000000 elements" in details
    negative = tf.make_tensor_proto([encoded(8, 8)], dtype=tf.string, shape=[1])
    negative.tensor_shape.dim[0].size = -1
    assert "negative" in _code(stub, _request(tensor=negative))[1]
    assert time.time() - start < 5  # answered from the protobuf, not after decoding
    # WebP is capped like the other formats: a header declaring 16383x16383.
    code, details = _code(stub, _request([webp_declaring(16383, 16383)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image refused" in details
    assert stub.Predict(_request([encoded(40, 40, 2)])).outputs["descriptors"].tensor_shape.dim[0].size == 1


def test_request_limits_on_images_and_pixels(exported):
    manager = ModelManager("deep_retrieval", str(__import__("pathlib").Path(exported["version"]).parent),
                                      poll_seconds=0)
    server, port = server_lib.build_server(manager, 0, limits=Limits(images=4, pixels=20_000))
    server.start()
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        code, details = _code(stub, _request([encoded(8, 8)] * 5))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "5 images in one request, at most 4" in details
        code, details = _code(stub, _request([encoded(100, 100)] * 3))  # 30,000 pixels declared
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "30000 pixels in all" in details
        code, details = _code(stub, _request(signature="pixels", tensor=tf.make_tensor_proto(
            np.zeros((3, 100, 100, 3), np.uint8))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Predict(_request([encoded(100, 100)] * 2)).outputs["descriptors"].tensor_shape.dim[0].size == 2
    finally:
        server.stop(0)
        manager.stop()


def test_compose_publishes_on_loopback_only():
    import os
    import re

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(here, "serving", "compose.yaml")) as f:
        text = f.read()
    ports = re.findall(r'^\s*-\s*"([^"]*:\d+)"', text.split("ports:")[1].split("volumes:")[0], re.M)
    assert len(ports) == 2 and all(p.startswith("127.0.0.1:") for p in ports), ports


def test_error_messages_are_bounded_and_unknown_dtypes_invalid(served):
    stub = served["stub"]
    code, details = _code(stub, _request([encoded(8, 8)], name="x" * 100_000))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 400 and "100000 characters" in details
    odd = tf.make_tensor_proto([encoded(8, 8)], dtype=tf.string, shape=[1])
    odd.dtype = 9999  # no such DataType
    code, details = _code(stub, _request(tensor=odd))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid" in details


def test_every_decodable_format_is_capped_and_empty_pixels_refused(served):
    stub = served["stub"]
    code, details = _code(stub, _request([encoded(20, 20), gif_frames_bomb(3000, 60)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "images[1]" in details and "GIF frames" in details
    code, details = _code(stub, _request([b"\xff\x0a" + bytes(40)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "JPEG XL is not accepted" in details
    empty = tf.make_tensor_proto(np.zeros((1, 0, 0, 3), np.uint8))
    code, details = _code(stub, _request(signature="pixels", tensor=empty))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "images of 0x0 pixels" in details
    # Sixteen 600-byte JPEGs declaring 9459 x 9459 each (each under the cap, 1.4 GP together).
    start = time.time()
    code, details = _code(stub, _request([jpeg_declaring(9459, 9459)] * 16))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pixels in all" in details
    assert time.time() - start < 5


class _Slow:
    """A signature function that takes ``seconds`` per image and counts the
    images it finished."""

    def __init__(self, fn, seconds):
        self.fn, self.seconds, self.images = fn, seconds, 0
        self.structured_input_signature, self.structured_outputs = fn.structured_input_signature, fn.structured_outputs

    def __call__(self, **inputs):
        count = int(inputs["images"].shape[0])
        time.sleep(self.seconds * count)
        out = self.fn(**inputs)
        self.images += count
        return out


def _slow_server(exported, seconds, **kwargs):
    manager = ModelManager("deep_retrieval", exported["base"], poll_seconds=0)
    slow = _Slow(manager.current.functions["serving_default"], seconds)
    manager.current.functions["serving_default"] = slow
    server, port = server_lib.build_server(manager, 0, **kwargs)
    server.start()
    return server, slow, prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def test_batches_run_in_chunks_and_stop_when_the_client_gives_up(served, exported, monkeypatch):
    blobs = [encoded(70, 110, 1), encoded(130, 60, 2, "PNG"), encoded(50, 50, 3, "GIF"), encoded(90, 90, 4)]
    monkeypatch.setattr(requests_lib, "CHUNK_PIXELS", 11_000)  # chunks of one or two images here
    out = tf.make_ndarray(served["stub"].Predict(_request(blobs)).outputs["descriptors"])
    want = reference_descriptors(exported["model"], blobs, exported["image_size"])
    assert np.abs(out - want).max() <= 1e-5
    monkeypatch.setattr(requests_lib, "CHUNK_PIXELS", 1)  # one image per chunk
    server, slow, stub = _slow_server(exported, 0.1)
    try:
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(_request([encoded(16, 16)] * 30), timeout=0.8)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(2.0)  # the server would need 3 s for all 30
        assert slow.images < 20, slow.images
    finally:
        server.stop(0)


def test_calls_over_the_concurrency_limit_are_refused_at_once(exported):
    server, slow, stub = _slow_server(exported, 1.0, max_threads=1, max_concurrent_rpcs=1)
    try:
        first = stub.Predict.future(_request([encoded(16, 16)]), timeout=30)
        time.sleep(0.3)
        code, details = _code(stub, _request([encoded(16, 16)]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.result().outputs["descriptors"].tensor_shape.dim[0].size == 1
    finally:
        server.stop(0)


def test_silent_and_idle_connections_are_closed(exported):
    arguments = server_lib.channel_arguments("grpc.server_handshake_timeout_ms=300, grpc.max_connection_idle_ms=300")
    assert dict(arguments)["grpc.keepalive_time_ms"] == server_lib.CHANNEL_ARGUMENTS["grpc.keepalive_time_ms"]
    with pytest.raises(ValueError, match="not key=value"):
        server_lib.channel_arguments("grpc.max_connection_idle_ms")
    manager = ModelManager("deep_retrieval", exported["base"], poll_seconds=0)
    server, port = server_lib.build_server(manager, 0, arguments=arguments)
    server.start()
    try:
        # A TCP connection that never speaks HTTP/2 is closed after the handshake timeout.
        silent = socket.create_connection(("127.0.0.1", port))
        silent.settimeout(10)
        start = time.time()
        while silent.recv(4096):
            pass
        assert time.time() - start < 5
        silent.close()
        # A client connection with no call for the idle time is sent away (it reconnects on demand).
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        states = []
        channel.subscribe(states.append)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "deep_retrieval"
        models.GetModelStatus(status, timeout=10)
        time.sleep(1.5)
        ready = states.index(grpc.ChannelConnectivity.READY)
        assert grpc.ChannelConnectivity.IDLE in states[ready:], states
        assert models.GetModelStatus(status, timeout=10).model_version_status[0].version == 1
        channel.close()
    finally:
        server.stop(0)
