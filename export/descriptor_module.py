"""The serving module of the descriptor model (TF Model Garden style).

Two signatures over one Keras descriptor model:

* ``serving_default``: ``images`` DT_STRING ``[-1]`` of encoded JPEG, PNG, GIF
  or BMP bytes, one image per element, any size and aspect ->
  ``descriptors`` DT_FLOAT ``[-1, D]``. Each image is decoded to RGB (alpha
  dropped, grayscale expanded, first GIF frame, EXIF orientation not applied),
  resized so its longest side is ``image_size`` and described at every scale
  of the model, inside the graph.
* ``pixels``: ``images`` DT_UINT8 ``[-1, -1, -1, 3]`` for callers that decode
  themselves (one size per batch) -> ``descriptors``.
"""

import keras
import tensorflow as tf

from deep_retrieval.data import pipeline


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

    def _build_inputs(self, encoded):
        """One encoded image -> float32 ``[h, w, 3]`` at the serving size."""
        return pipeline.resize_longest(pipeline.decode(encoded), self.image_size)

    def _describe(self, image):
        return self.model(image[None], training=False)[0]

    def serve(self, images):
        """Encoded images ``[N]`` -> ``{"descriptors": [N, D]}``."""
        descriptors = tf.map_fn(
            lambda data: self._describe(self._build_inputs(data)),
            images,
            fn_output_signature=tf.TensorSpec([self.descriptor_size], tf.float32),
        )
        return {"descriptors": descriptors}

    def serve_pixels(self, images):
        """uint8 pixels ``[N, H, W, 3]`` -> ``{"descriptors": [N, D]}``."""
        pixels = tf.cast(images, tf.float32)
        shape = tf.cast(tf.shape(pixels)[1:3], tf.float32)
        scale = self.image_size / tf.reduce_max(shape)
        size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
        pixels = tf.image.resize(pixels, size, method="bilinear", antialias=True)
        return {"descriptors": self.model(pixels, training=False)}

    def archive(self):
        """A `keras.export.ExportArchive` with both signatures."""
        archive = keras.export.ExportArchive()
        archive.track(self.model)
        archive.add_endpoint(
            "serving_default",
            self.serve,
            input_signature=[tf.TensorSpec([None], tf.string, name="images")],
        )
        archive.add_endpoint(
            "pixels",
            self.serve_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        )
        return archive
