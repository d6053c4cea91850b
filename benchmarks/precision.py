"""A model's descriptors and mAP under float32 and bfloat16, side by side.

Describes the built-in real-photo held-out split (or ``--data_root/--dataset``)
with the model in float32 and with its backbone in bfloat16 (`DescriptorConfig.dtype`),
and prints the cosine of each image's two descriptors, both mAP tables and
the extraction time of each.

    python benchmarks/precision.py --model runs/demo/model.keras
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from deep_retrieval.config import SyntheticConfig  # noqa: E402
from deep_retrieval.data import groundtruth, synthetic  # noqa: E402
from deep_retrieval.model.descriptor_model import for_inference, image_size_of  # noqa: E402
from deep_retrieval.retrieval import (
    evaluation,
    extraction,  # noqa: E402
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras descriptor model")
    parser.add_argument("--data_root", default="")
    parser.add_argument("--dataset", default="")
    args = parser.parse_args()
    if args.data_root:
        data = groundtruth.load_dataset(args.data_root, args.dataset)
    else:
        data = groundtruth.load_dataset(synthetic.ensure_dataset(SyntheticConfig(), progress=False),
                                        synthetic.DATASET_NAME)
    model = keras.models.load_model(args.model)
    size = image_size_of(model)
    boxes = None
    if any(b is not None for b in data.query_boxes):
        boxes = [[float("nan")] * 4 if b is None else list(b) for b in data.query_boxes]
    out = {}
    for dtype in ("float32", "bfloat16"):
        describe = extraction.model_describer(for_inference(model, dtype), size, progress=False)
        describe(data.queries[:2], None if boxes is None else boxes[:2])  # compile first
        start = time.perf_counter()
        db = describe(data.images)
        q = describe(data.queries, boxes)
        seconds = time.perf_counter() - start
        ranks = evaluation.rank_by_similarity(q, db)
        out[dtype] = (db, q, evaluation.evaluate(ranks, data.gnd, query_indices=data.query_indices), seconds)
        print(f"{dtype}: {len(db) + len(q)} images in {seconds:.1f} s\n"
              f"{evaluation.format_table(out[dtype][2])}", flush=True)
    cos = np.concatenate([np.sum(out["float32"][k] * out["bfloat16"][k], 1) for k in (0, 1)])
    print(f"cosine bfloat16 vs float32 over {len(cos)} images: min {cos.min():.5f}, mean {cos.mean():.5f}")
    print(f"bfloat16 / float32 speed: {out['float32'][3] / out['bfloat16'][3]:.2f}x")


if __name__ == "__main__":
    main()
