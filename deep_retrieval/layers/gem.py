import keras

from deep_retrieval.layers.gem_pooling import GeMPooling
from deep_retrieval.layers.l2_normalization import L2Normalization


@keras.saving.register_keras_serializable(package="deep_retrieval")
class GeM(keras.layers.Layer):
    """The GeM head of the PyTorch retrieval models (cirtorch, dirtorch):
    GeM pooling (or global max-pooling, MAC), optionally L2, optionally a
    fully-connected layer (learned whitening), then L2.

    cirtorch: ``L2(fc(L2(gem(x))))``, or ``L2(gem(x))`` without learned
    whitening; dirtorch: ``L2(fc(gem(x)))`` (``normalize_pooled=False``).
    Computes in float32.

    Args:
        p: GeM's initial power.
        normalize_pooled: L2-normalise the pooled vector before ``fc``.
        fc_units: output size of the fully-connected layer (with bias), or
            None for none.
        epsilon: GeM's clamp.
        mac: global max-pooling in place of GeM (dirtorch's
            ``pooling="max"``, as in Resnet101-TL-MAC); ``p`` is unused.

    Call arguments:
        inputs: ``[N, H, W, C]`` feature maps of any spatial size.

    Returns ``[N, fc_units or C]`` L2-normalised descriptors.

    Example:
    >>> head = GeM(p=3.0, fc_units=2048)
    >>> head(np.random.rand(2, 24, 32, 2048).astype("float32")).shape
    (2, 2048)
    """

    def __init__(self, p=3.0, normalize_pooled=True, fc_units=None, epsilon=1e-6, mac=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.initial_p, self.epsilon = float(p), epsilon
        self.normalize_pooled = bool(normalize_pooled)
        self.fc_units = None if fc_units is None else int(fc_units)
        self.mac = bool(mac)
        if self.mac:
            self.pooling = keras.layers.GlobalMaxPooling2D(dtype=self.dtype_policy, name="max_pooling")
        else:
            self.pooling = GeMPooling(p, epsilon, dtype=self.dtype_policy, name="gem_pooling")
        self.normalize = L2Normalization(dtype=self.dtype_policy, name="l2_normalization")
        self.fc = None if fc_units is None else keras.layers.Dense(self.fc_units, dtype=self.dtype_policy, name="fc")
        # What `DescriptorModel` asks of every head: no RPN, no PCA-whitening
        # layer to fit before training.
        self.rpn = self.pca = None

    def build(self, input_shape):
        self.pooling.build(input_shape)
        if self.fc is not None:
            self.fc.build((None, input_shape[-1]))

    def call(self, inputs):
        x = self.pooling(inputs)
        if self.normalize_pooled:
            x = self.normalize(x)
        if self.fc is not None:
            x = self.fc(x)
        return self.normalize(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.fc_units or input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.initial_p, "normalize_pooled": self.normalize_pooled,
                       "fc_units": self.fc_units, "epsilon": self.epsilon, "mac": self.mac})
        return config
