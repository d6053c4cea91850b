import math

import numpy as np

from deep_retrieval.ops import boxes as boxes_lib
from tests.reference import np_iou, random_boxes


def test_encode_hand_worked_and_round_trip():
    anchor = np.array([[0, 0, 4, 2]], "float32")
    box = np.array([[1, 1, 9, 3]], "float32")
    # Centres (2, 1) and (5, 2); sizes 4x2 and 8x2.
    np.testing.assert_allclose(
        np.asarray(boxes_lib.encode(box, anchor)), [[0.75, 0.5, math.log(2), 0.0]], atol=1e-6
    )
    rng = np.random.RandomState(0)
    boxes, anchors = random_boxes(rng, 50), random_boxes(rng, 50)
    back = np.asarray(boxes_lib.decode(boxes_lib.encode(boxes, anchors), anchors))
    np.testing.assert_allclose(back, boxes, atol=1e-4)



def test_decode_clamps_scale():
    anchor = np.array([[0, 0, 2, 2]], "float32")
    out = np.asarray(boxes_lib.decode(np.array([[0, 0, 50.0, 0]], "float32"), anchor))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 2 * 1000 / 16, rtol=1e-5)



def test_box_iou_matches_numpy():
    rng = np.random.RandomState(1)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    want = np.array([[np_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(np.asarray(boxes_lib.box_iou(a, b)), want, atol=1e-6)
