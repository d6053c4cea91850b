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

Then the batch runs in chunks of `serving.requests.CHUNK_PIXELS` under a process-wide
memory budget (``--max_pixels_in_flight``): concurrent requests wait their
turn rather than overcommit, and a request whose client cancelled it or
whose deadline passed stops before its next chunk. Idle, silent and dead
connections are closed (`serving.service.CHANNEL_ARGUMENTS`), and at most
``--max_concurrent_rpcs`` calls are held at once.
"""

import logging
import signal
import threading

from absl import app, flags

from deep_retrieval import cli
from serving.requests import LIMITS

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
    flags.DEFINE_list("allowed_hosts", None, "Host names the REST API answers to (default: loopback names when "
                      "--host is loopback, any otherwise; * for any): a DNS-rebinding page gets 403.", **fv)
    flags.DEFINE_string("grpc_channel_arguments", "", "Comma-separated gRPC server arguments, key=value, over "
                        "the defaults in serving.server.CHANNEL_ARGUMENTS (idle, age and handshake timeouts).", **fv)


log = logging.getLogger("serving.server")


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
    from serving.metrics import Metrics
    from serving.model_manager import ModelManager
    from serving.requests import Limits, PixelBudget
    from serving.service import build_server, channel_arguments

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
                          FLAGS.max_message_bytes, FLAGS.rest_api_num_threads,
                          allowed_hosts=FLAGS.allowed_hosts)
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
