"""Query descriptors for search: an index's queries described through a
TF Serving server or by an exported SavedModel in process (`Describer`),
their crop box checked against the image (`check_box`). Shared by the
`serving.search` command and the `serving.web` page."""

from absl import flags

from deep_retrieval.data.image_headers import read_header
from deep_retrieval.data.images import box_problem


def define_flags():
    """The index and where query descriptors come from (`Describer`), for a command."""
    flags.DEFINE_string("index", None, "Index folder (python -m serving.index).")
    flags.DEFINE_string("server", None, "host:port of a TF Serving (or embedded) server.")
    flags.DEFINE_string("model_name", "deep_retrieval", "ModelSpec.name on the server.")
    flags.DEFINE_string("saved_model", None, "An exported SavedModel folder, instead of --server.")


def check_box(data, box):
    """``(box, pixels)``: ``box`` (``--box`` values, or None) as four floats,
    refused unless it crops the encoded image
    (`deep_retrieval.data.images.box_problem`), and the pixels the image's
    header declares; a ValueError when ``data`` is not a readable image."""
    try:
        _, width, height = read_header(data)
    except ValueError as e:
        raise ValueError(f"the query is {e}") from None
    if box is None:
        return None, width * height
    if len(box) != 4:
        raise ValueError(f"--box needs x0,y0,x1,y1, got {','.join(box)}")
    problem = box_problem(box, width, height)
    if problem:
        raise ValueError(f"--{problem}")
    return [float(v) for v in box], width * height


class Describer:
    """Descriptors of encoded images (cropped to a box by the model's
    ``crops`` signature): through a server (``server``, asking for model
    ``version`` if given) or an exported SavedModel loaded once
    (``saved_model``). Errors are ValueErrors saying why, in one line."""

    def __init__(self, server=None, model_name="deep_retrieval", saved_model=None, version=None):
        import tensorflow as tf

        self.server, self.version = server, version
        if saved_model:
            try:
                self.signatures = tf.saved_model.load(saved_model).signatures
            except (OSError, ValueError) as e:
                raise ValueError(f"{saved_model}: cannot load the SavedModel ({str(e).splitlines()[0][:200]})")
            return
        from serving import batch_client

        self.signatures = None
        replicas = batch_client.Replicas([server])
        self.extractors = {name: batch_client.Extractor(replicas, model_name, name, 60, 3, version)
                           for name in ("serving_default", "crops")}

    def __call__(self, data, box=None):
        import grpc
        import numpy as np
        import tensorflow as tf

        signature = "crops" if box else "serving_default"
        if self.signatures is not None:
            inputs = {"images": tf.constant([data])}
            if box:
                inputs["boxes"] = tf.constant([box], tf.float32)
            try:
                return self.signatures[signature](**inputs)["descriptors"].numpy()[0]
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(f"the query cannot be described: {e.message.splitlines()[0][:300]}") from None
        try:
            return np.asarray(self.extractors[signature].predict([data], [box] if box else None))[0]
        except grpc.RpcError as e:
            hint = ""
            if self.version is not None and e.code() == grpc.StatusCode.NOT_FOUND:
                hint = f" (the index holds descriptors of version {self.version}: serve it, or rebuild the index)"
            elif e.code() == grpc.StatusCode.UNAVAILABLE:
                hint = " (is the server running?)"
            details = " ".join((e.details() or "").split())[:300]
            raise ValueError(f"{self.server} answered {e.code().name}: {details}{hint}") from None
