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
"""

import keras
import tensorflow as tf

from deep_retrieval.data.images import decode, scale_views


class DescriptorModule:
    """Builds the serving functions of a descriptor model.

    Args:
        model: a `deep_retrieval.model.DescriptorModel`.
        image_size: longest side (pixels) images are resized to.
    """

    def __init__(self, model, image_size):
        self.model = model
        self.image_size = int(image_size)
        self.descriptor_size = int(model.descriptor_size)

    def _describe(self, image, box=None):
        """One decoded image (and optional box) -> its ``[D]`` descriptor."""
        views = scale_views(image, self.image_size, self.model.config.scales, box)
        return self.model([v[None] for v in views], training=False)[0]

    def _map(self, fn, elems):
        return tf.map_fn(
            fn, elems, fn_output_signature=tf.TensorSpec([self.descriptor_size], tf.float32)
        )

    def serve(self, images):
        """Encoded images ``[N]`` -> ``{"descriptors": [N, D]}``."""
        return {"descriptors": self._map(lambda data: self._describe(decode(data)), images)}

    def serve_crops(self, images, boxes):
        """Encoded images ``[N]``, boxes ``[N, 4]`` -> ``{"descriptors": [N, D]}``."""
        return {"descriptors": self._map(
            lambda item: self._describe(decode(item[0]), item[1]), (images, boxes)
        )}

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
