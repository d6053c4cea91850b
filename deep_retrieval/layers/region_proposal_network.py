import keras
from keras import ops

from deep_retrieval.ops import proposals


@keras.saving.register_keras_serializable(package="deep_retrieval")
class RegionProposalNetwork(keras.layers.Layer):
    """Proposes the regions R-MAC pools, from the backbone's last feature map.

    A 3x3 convolution with ReLU, then per anchor an objectness logit and four
    box deltas (1x1 convolutions). Anchors sit at every feature cell, with
    sides relative to the map's short side (`deep_retrieval.ops.proposals.anchors`);
    the decoded boxes are clipped to the map, the best ``pre_nms_proposals``
    go through vectorised greedy NMS, and the top ``num_proposals`` are kept.
    Boxes are in feature-cell units, so the layer works at every scale and
    with map sizes known only at run time. Computes in float32.

    Args:
        num_proposals: proposals returned per image (``K``).
        pre_nms_proposals: best-scored boxes entering NMS (``>= K``).
        nms_threshold: NMS IoU threshold.
        anchor_scales: anchor sides as a share of the map's short side.
        anchor_ratios: anchor aspect ratios (width / height).
        channels: width of the 3x3 convolution.

    Call arguments:
        features: ``[N, H, W, C]`` feature map.

    Returns:
        ``(boxes, scores, valid)``: ``[N, K, 4]`` boxes ``(x0, y0, x1, y1)``
        in cells, ``[N, K]`` objectness probabilities, ``[N, K]`` bool (False
        for padding when fewer than ``K`` boxes survive NMS).

    Example:
    >>> layer = RegionProposalNetwork(num_proposals=16)
    >>> boxes, scores, valid = layer(np.random.rand(1, 10, 14, 64))
    >>> boxes.shape  # (1, 16, 4)

    Reference:
        Ren et al., "Faster R-CNN", NIPS 2015; Gordo et al., "End-to-end
        learning of deep visual representations for image retrieval", IJCV
        2017, Section 3.3.
    """

    def __init__(
        self,
        num_proposals=256,
        pre_nms_proposals=1000,
        nms_threshold=0.7,
        anchor_scales=proposals.DEFAULT_ANCHOR_SCALES,
        anchor_ratios=proposals.DEFAULT_ANCHOR_RATIOS,
        channels=256,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not 1 <= num_proposals <= pre_nms_proposals:
            raise ValueError(
                f"Need 1 <= num_proposals <= pre_nms_proposals, got {num_proposals} "
                f"and {pre_nms_proposals}."
            )
        if not 0 < nms_threshold <= 1:
            raise ValueError(f"`nms_threshold` must be in (0, 1], got {nms_threshold}.")
        self.num_proposals = int(num_proposals)
        self.pre_nms_proposals = int(pre_nms_proposals)
        self.nms_threshold = float(nms_threshold)
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.channels = int(channels)
        self.shapes = proposals.anchor_shapes(self.anchor_scales, self.anchor_ratios)
        self.num_anchors = len(self.shapes)
        self.conv = keras.layers.Conv2D(
            self.channels, 3, padding="same", activation="relu",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype=self.dtype_policy, name="conv",
        )
        self.objectness = keras.layers.Conv2D(
            self.num_anchors, 1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype=self.dtype_policy, name="objectness",
        )
        self.box_deltas = keras.layers.Conv2D(
            4 * self.num_anchors, 1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype=self.dtype_policy, name="box_deltas",
        )

    def build(self, input_shape):
        self.conv.build(input_shape)
        hidden = tuple(input_shape[:-1]) + (self.channels,)
        self.objectness.build(hidden)
        self.box_deltas.build(hidden)

    def raw_outputs(self, features):
        """``(logits [N, M], deltas [N, M, 4], anchors [M, 4])`` for every
        anchor ``M = H * W * A`` (what the RPN loss is computed on), in
        float32 whatever the dtype policy: box coding and the loss need its
        precision."""
        features = ops.cast(features, self.compute_dtype)
        _, height, width, _ = ops.shape(features)
        hidden = self.conv(features)
        batch = ops.shape(features)[0]
        logits = ops.reshape(self.objectness(hidden), (batch, -1))
        deltas = ops.reshape(self.box_deltas(hidden), (batch, -1, 4))
        return ops.cast(logits, "float32"), ops.cast(deltas, "float32"), proposals.anchors(height, width, self.shapes)

    def call(self, features):
        _, height, width, _ = ops.shape(features)
        logits, deltas, anchor_boxes = self.raw_outputs(ops.stop_gradient(features))
        boxes, scores, valid = proposals.propose(
            logits, deltas, anchor_boxes, height, width, self.num_proposals,
            self.pre_nms_proposals, self.nms_threshold,
        )
        return ops.stop_gradient(boxes), ops.stop_gradient(scores), valid

    def compute_output_shape(self, input_shape):
        batch, k = input_shape[0], self.num_proposals
        return (batch, k, 4), (batch, k), (batch, k)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_proposals": self.num_proposals,
                "pre_nms_proposals": self.pre_nms_proposals,
                "nms_threshold": self.nms_threshold,
                "anchor_scales": list(self.anchor_scales),
                "anchor_ratios": list(self.anchor_ratios),
                "channels": self.channels,
            }
        )
        return config
