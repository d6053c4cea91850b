"""What one request may ask of the server, checked from its protobuf before
any work, and the memory budget all requests share (see `serving.server`).

Every limit answers with TF Serving's codes: INVALID_ARGUMENT for a request
that is wrong, RESOURCE_EXHAUSTED for one that asks too much, CANCELLED or
DEADLINE_EXCEEDED for one whose client gave up while it waited.
"""

import contextlib
import threading

import grpc

from deep_retrieval.data.image_headers import JPEG_XL, header_pixels, read_header
from deep_retrieval.data.images import JPEG_XL_REFUSED


class InvalidRequest(Exception):
    """A request error with its gRPC status code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def bounded(text, limit=200):
    """User-supplied text as echoed in an error message: at most ``limit``
    characters."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class Limits:
    """What one request may ask for (see the module docstring)."""

    def __init__(self, images=256, pixels=256_000_000):
        self.images, self.pixels = int(images), int(pixels)


LIMITS = Limits()

_VALUE_FIELDS = {"uint8": "int_val", "int32": "int_val", "int64": "int64_val", "float32": "float_val"}


def check_proto(key, proto, spec, limits):
    """Refuses a tensor whose content does not match its declared shape, or
    that declares more images than ``limits`` allow, before decoding it."""
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: unknown or negative dimension")
    declared = 1
    for d in dims:
        declared *= d
    if spec.dtype.name == "string":
        held = len(proto.string_val)
    elif proto.tensor_content:
        held = len(proto.tensor_content) / spec.dtype.size
    else:
        held = len(getattr(proto, _VALUE_FIELDS.get(spec.dtype.name, "float_val")))
    if held != declared:
        raise InvalidRequest(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {key}: the shape {dims} declares {declared} elements, the tensor holds {held:g}",
        )
    if dims and dims[0] > limits.images:
        raise InvalidRequest(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"input {key}: {dims[0]} images in one request, at most {limits.images}",
        )


def check_pixels(key, value, spec, limits):
    """The pixels each image of a batch declares (``None`` for an input that
    is not images); refuses a batch over ``limits``."""
    import tensorflow as tf

    from deep_retrieval.data.images import MAX_PIXELS

    if spec.dtype == tf.string:
        sizes = []
        for position, data in enumerate(value.reshape(-1)):
            try:
                pixels = int(header_pixels(data))
            except tf.errors.InvalidArgumentError:
                pixels = 0  # a broken header: the decoder names the image
            if pixels == JPEG_XL:
                raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"{key}[{position}]: {JPEG_XL_REFUSED}")
            if pixels > MAX_PIXELS:
                raise InvalidRequest(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{key}[{position}]: image refused: its header declares more than {MAX_PIXELS} pixels, "
                    "all GIF frames counted (decompression bomb?)",
                )
            sizes.append(pixels)
    elif value.ndim == 4:
        height, width = value.shape[1:3]
        if height * width == 0:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: images of {height}x{width} pixels")
        if height * width > MAX_PIXELS:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"input {key}: images of {height}x{width} pixels, more than {MAX_PIXELS}")
        sizes = [height * width] * value.shape[0]
    else:
        return None
    if sum(sizes) > limits.pixels:
        raise InvalidRequest(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"input {key}: the images declare {sum(sizes)} pixels in all, at most {limits.pixels} per request",
        )
    return sizes


def image_size(data):
    """``(width, height)`` from an encoded image's header, or None (the
    decoder then names what is wrong with the image)."""
    try:
        return read_header(data)[1:]
    except ValueError:
        return None


def check_boxes(images, boxes):
    """Refuses crop ``boxes`` (``[N, 4]``) that cannot crop their encoded
    ``images`` (``[N]``): `deep_retrieval.data.images.box_problem`, the one
    check that gRPC, REST, the web page and `serving.search` share."""
    from deep_retrieval.data.images import box_problem

    if len(boxes) != len(images):
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{len(images)} images and {len(boxes)} boxes: one box per image")
    for position, (data, box) in enumerate(zip(images.reshape(-1), boxes)):
        size = image_size(data)
        problem = box_problem(box, *size) if size else None
        if problem:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"boxes[{position}]: {problem}")


class PixelBudget:
    """Decoded pixels all requests together may hold at once.

    A request takes its share chunk by chunk (`CHUNK_PIXELS`) and waits
    while the budget is spent, so concurrent requests queue instead of
    overcommitting memory. A request that is cancelled, or whose deadline
    passes, while it waits stops there.

    Args:
        pixels: the budget; at least one image's worth (``MAX_PIXELS``).
    """

    def __init__(self, pixels):
        from deep_retrieval.data.images import MAX_PIXELS

        if pixels < MAX_PIXELS:
            raise ValueError(f"--max_pixels_in_flight {pixels} is below one image's limit of {MAX_PIXELS} pixels")
        self.capacity, self.used = int(pixels), 0
        self._turn = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels, context=None):
        with self._turn:
            while self.used and self.used + pixels > self.capacity:
                check_alive(context)
                self._turn.wait(0.05)
            self.used += pixels
        try:
            yield
        finally:
            with self._turn:
                self.used -= pixels
                self._turn.notify_all()


CHUNK_PIXELS = 16_000_000
"""Images run through the model at most this many declared pixels at a time
(and one image at least): the unit of the memory budget, and the most work
a request does after its client has given up."""


def check_alive(context):
    """Stops a request whose client cancelled it or whose deadline passed."""
    if context is None:
        return
    if not context.is_active():
        raise InvalidRequest(grpc.StatusCode.CANCELLED, "the request was cancelled")
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise InvalidRequest(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")


def chunks(sizes):
    """Consecutive index ranges of at most `CHUNK_PIXELS` declared pixels."""
    start, total = 0, 0
    for i, pixels in enumerate(sizes):
        if i > start and total + pixels > CHUNK_PIXELS:
            yield start, i, total
            start, total = i, 0
        total += pixels
    yield start, len(sizes), total
