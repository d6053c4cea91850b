import keras
import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.layers import RegionProposalNetwork
from deep_retrieval.ops import boxes as boxes_lib
from deep_retrieval.ops import proposals
from tests import keras_utils


def test_outputs_are_the_decoded_nms_proposals():
    keras.utils.set_random_seed(0)
    layer = RegionProposalNetwork(num_proposals=8, pre_nms_proposals=40, nms_threshold=0.5)
    x = np.random.RandomState(0).rand(2, 6, 9, 16).astype("float32")
    boxes, scores, valid = (np.asarray(t) for t in layer(x))
    assert boxes.shape == (2, 8, 4) and scores.shape == (2, 8) and valid.shape == (2, 8)
    logits, deltas, anchors = (np.asarray(t) for t in layer.raw_outputs(x))
    assert logits.shape == (2, 6 * 9 * 12) and anchors.shape == (6 * 9 * 12, 4)
    want_boxes, _, want_valid = proposals.propose(logits, deltas, anchors, 6, 9, 8, 40, 0.5)
    np.testing.assert_array_equal(valid, np.asarray(want_valid))
    assert valid[:, 0].all()  # the best-scored box always survives NMS
    np.testing.assert_allclose(boxes[valid], np.asarray(want_boxes)[valid], atol=1e-6)
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= 9).all() and (boxes[..., 3] <= 6).all()
    for b, v in zip(boxes, valid):  # kept proposals overlap by at most the threshold
        iou = np.asarray(boxes_lib.box_iou(b[v], b[v]))
        assert (iou[~np.eye(int(v.sum()), dtype=bool)] <= 0.5 + 1e-6).all()


def test_round_trip_and_one_graph_for_all_sizes(tmp_path):
    layer = RegionProposalNetwork(num_proposals=5, pre_nms_proposals=20, anchor_scales=(0.5, 1.0),
                                  anchor_ratios=(1.0,), channels=8)
    x = np.random.RandomState(1).rand(1, 4, 5, 6).astype("float32")
    model = keras_utils.wrap(layer, (None, None, 6), output_index=0)
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    assert loaded.layers[-1].get_config()["anchor_scales"] == [0.5, 1.0]
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 6])])
    for size in [(4, 5), (9, 3), (1, 1)]:
        x = np.random.RandomState(2).rand(2, *size, 6).astype("float32")
        np.testing.assert_allclose(fn(x)[0].numpy(), np.asarray(layer(x)[0]), atol=1e-6)
    assert fn.experimental_get_tracing_count() == 1


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_proposals"):
        RegionProposalNetwork(num_proposals=300, pre_nms_proposals=100)
    with pytest.raises(ValueError, match="nms_threshold"):
        RegionProposalNetwork(nms_threshold=0)


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.rand(2, 6, 9, 16).astype("float32")
    keras_utils.run_layer_test(RegionProposalNetwork, dict(num_proposals=8, pre_nms_proposals=40), inputs,
                               [(2, 8, 4), (2, 8), (2, 8)], tmp_path)
