import keras
from keras import ops

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "torch", "tf", "none")


@keras.saving.register_keras_serializable(package="deep_retrieval")
class ImagePreprocessing(keras.layers.Layer):
    """Maps RGB pixels in ``[0, 255]`` to what a backbone was trained on.

    The modes are those of `keras.applications.imagenet_utils`:
    ``"caffe"`` (RGB to BGR, ImageNet mean subtracted; ResNet and VGG),
    ``"torch"`` (``[0, 1]`` then ImageNet mean/std), ``"tf"`` (``[-1, 1]``),
    ``"none"``. Written with `keras.ops` so it runs inside the model on every
    backend.

    Args:
        mode: one of ``"caffe"``, ``"torch"``, ``"tf"``, ``"none"``.

    Call arguments:
        inputs: ``[N, H, W, 3]`` float RGB in ``[0, 255]``.

    Example:
    >>> ImagePreprocessing("caffe")(np.full((1, 2, 2, 3), 128.0))

    Reference:
        `keras.applications.imagenet_utils.preprocess_input`.
    """

    def __init__(self, mode="caffe", **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights to create
        if mode not in MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; expected one of {MODES}.")
        self.mode = mode

    def call(self, inputs):
        if self.mode == "caffe":
            return ops.flip(inputs, axis=-1) - ops.convert_to_tensor(
                _CAFFE_BGR_MEAN, inputs.dtype
            )
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, inputs.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, inputs.dtype)
            return (inputs / 255.0 - mean) / std
        if self.mode == "tf":
            return inputs / 127.5 - 1.0
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config
