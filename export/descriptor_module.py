"""The serving module of the descriptor model (TF Model Garden style).

Three signatures over one Keras descriptor model:

* ``serving_default``: ``images`` DT_STRING ``[-1]`` of encoded JPEG, PNG, GIF
  or BMP bytes, one image per element, any size and aspect ->
  ``descriptors`` DT_FLOAT ``[-1, D]``. Each image is decoded to RGB (alpha
  dropped, grayscale expanded, first GIF frame, EXIF orientation not applied)
  and, for each scale ``s`` of the model, resized from the decoded image so
  its longest side is ``s * image_size`` (DIR's multi-resolution), inside
  the graph.
* ``crops``: ``images`` as above and ``boxes`` DT_FLOAT ``[-1, 4]``
  (``x0, y0, x1, y1`` in the image's pixels; a row with a NaN: no crop) ->
  ``descriptors``. The crop keeps its image's scale: it is resized by the
  factor that brings the *full* image to ``s * image_size``, as the
  retrieval protocols treat query boxes.
* ``pixels``: ``images`` DT_UINT8 ``[-1, -1, -1, 3]`` for callers that decode
  themselves (one size per batch, at the original resolution) ->
  ``descriptors``.

``serving_default`` and ``crops`` decode and resize every image first, then
group the images whose views have the same shapes at every scale (photos of
one aspect ratio) and run each group through the network as one batch of at
most `MAX_BATCH` images: a request of same-size photos costs one backbone
call per scale, not one per image.
"""

import keras
import tensorflow as tf

from deep_retrieval.data.images import decode, scale_views

MAX_BATCH = 16
"""Images per network call inside a request (bounds activation memory)."""


class DescriptorModule:
    """Builds the serving functions of a descriptor model.

    Args:
        model: a `deep_retrieval.model.descriptor_model.DescriptorModel`.
        image_size: longest side (pixels) images are resized to.
    """

    def __init__(self, model, image_size):
        self.model = model
        self.image_size = int(image_size)
        self.descriptor_size = int(model.descriptor_size)

    def _describe_batched(self, images, boxes=None):
        """Encoded images ``[N]`` (and boxes ``[N, 4]``) -> ``[N, D]``, the
        images grouped by the shapes of their views (see the module).

        Explicit `tf.while_loop`s: Keras traces endpoints without AutoGraph.
        """
        scales = self.model.config.scales
        count = tf.shape(images)[0]

        def prepare(i, views, keys):
            box = None if boxes is None else boxes[i]
            scaled = scale_views(decode(images[i]), self.image_size, scales, box)
            views = [ta.write(i, v) for ta, v in zip(views, scaled)]
            return i + 1, views, keys.write(i, tf.concat([tf.shape(v)[:2] for v in scaled], 0))

        views = [tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=[None, None, 3])
                 for _ in scales]
        keys = tf.TensorArray(tf.int32, size=count, element_shape=[2 * len(scales)])
        _, views, keys = tf.while_loop(lambda i, *_: i < count, prepare, (0, views, keys))
        shapes, group = tf.raw_ops.UniqueV2(x=tf.reshape(keys.stack(), [count, 2 * len(scales)]), axis=[0])
        # Chunks of at most MAX_BATCH images of one group, group after group.
        members = tf.argsort(group, stable=True)
        sizes = tf.math.bincount(group, minlength=tf.shape(shapes)[0], dtype=tf.int32)
        offsets = tf.cumsum(sizes, exclusive=True)
        per_group = (sizes + MAX_BATCH - 1) // MAX_BATCH
        chunk_ends = tf.cumsum(per_group)

        def run(chunk, out):
            g = tf.searchsorted(chunk_ends, [chunk], side="right")[0]
            start = offsets[g] + (chunk - (chunk_ends[g] - per_group[g])) * MAX_BATCH
            part = members[start:tf.minimum(start + MAX_BATCH, offsets[g] + sizes[g])]
            batch = [ta.gather(part) for ta in views]
            return chunk + 1, tf.tensor_scatter_nd_update(out, part[:, None], self.model(batch, training=False))

        chunks = tf.reduce_sum(per_group)
        out = tf.zeros([count, self.descriptor_size], tf.float32)
        _, out = tf.while_loop(lambda c, _: c < chunks, run, (0, out))
        return out

    def serve(self, images):
        """Encoded images ``[N]`` -> ``{"descriptors": [N, D]}``."""
        return {"descriptors": self._describe_batched(images)}

    def serve_crops(self, images, boxes):
        """Encoded images ``[N]``, boxes ``[N, 4]`` -> ``{"descriptors": [N, D]}``."""
        return {"descriptors": self._describe_batched(images, boxes)}

    def serve_pixels(self, images):
        """uint8 pixels ``[N, H, W, 3]`` -> ``{"descriptors": [N, D]}``."""
        pixels = tf.cast(images, tf.float32)
        views = scale_views(pixels, self.image_size, self.model.config.scales)
        return {"descriptors": self.model(list(views), training=False)}

    def archive(self):
        """A `keras.export.ExportArchive` with the three signatures."""
        archive = keras.export.ExportArchive()
        archive.track(self.model)
        archive.add_endpoint(
            "serving_default",
            self.serve,
            input_signature=[tf.TensorSpec([None], tf.string, name="images")],
        )
        archive.add_endpoint(
            "crops",
            self.serve_crops,
            input_signature=[
                tf.TensorSpec([None], tf.string, name="images"),
                tf.TensorSpec([None, 4], tf.float32, name="boxes"),
            ],
        )
        archive.add_endpoint(
            "pixels",
            self.serve_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        )
        return archive
