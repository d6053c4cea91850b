"""Trust boundaries: loopback by default, capped message sizes."""

import socket

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import server as server_cmd
from serving import service as server_lib
from serving.model_manager import ModelManager
from tests.helpers_images import encoded


def _outward_address():
    """This machine's address on its default route, or None (no network)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for UDP connect
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_server_defaults_to_loopback():
    import inspect

    from absl import flags

    values = flags.FlagValues()
    server_cmd.define_flags(values)
    assert values["host"].default == "127.0.0.1"
    assert inspect.signature(server_lib.build_server).parameters["host"].default == "127.0.0.1"


def test_server_is_not_reachable_from_outside_by_default(exported):
    outward = _outward_address()
    if outward is None:
        pytest.skip("no non-loopback interface on this machine")
    manager = ModelManager("deep_retrieval", exported["base"], poll_seconds=0)
    server, port = server_lib.build_server(manager, 0)
    server.start()
    try:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((outward, port)) != 0  # refused: bound to 127.0.0.1 only
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        server.stop(0)


def test_oversized_request_is_refused_and_server_keeps_serving(exported):
    manager = ModelManager("deep_retrieval", exported["base"], poll_seconds=0)
    server, port = server_lib.build_server(manager, 0, max_message_bytes=1 << 20)
    server.start()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]))

    def request(blobs):
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "deep_retrieval"
        r.inputs["images"].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string, shape=[len(blobs)]))
        return r

    try:
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request([b"\xff\xd8" + b"\x00" * (2 << 20)]), timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        out = stub.Predict(request([encoded(50, 60, 1)]), timeout=60)
        assert tf.make_ndarray(out.outputs["descriptors"]).shape == (1, 32)
    finally:
        server.stop(0)
