"""How each paper-fidelity change moves retrieval on the built-in real-photo split.

Scores one model on the held-out split of the built-in data (or a dataset in
the Revisited Oxford layout), side by side in one run, under:

* ``before``: the pre-fix preparation: a query crop resized so its own
  longest side is ``S`` (magnified), every scale resized from the ``S``-px
  image (the 1050/800 scale upsampled);
* ``+crop``: query crops keep their image's scale (box scaled by
  ``S / max(W, H)``), scales still from the ``S``-px image;
* ``+scales``: every scale resized once from the original: the library's
  preparation (`extraction.model_describer`);

then on the library's descriptors: ``+aqe`` (DIR's plain-average QE, k = 1,
alpha = 0; ``--qe``), ``+dba`` (DIR's weighted DBA, ``--dba``), both, and
``+rerank`` (SuperGlobal global re-ranking, `reranking.superglobal_rerank`),
alone and after DBA.

    python benchmarks/fidelity.py --model runs/demo/model.keras
    python benchmarks/fidelity.py --backbone efficientnet_lite0   # off the shelf

Prints Easy/Medium/Hard mAP per variant and a JSON line.
"""

import argparse
import json


def _legacy_describer(model, longest, crop_keeps_scale):
    """The preparation before the fixes (see the module docstring)."""
    import numpy as np
    import tensorflow as tf

    from deep_retrieval.data.images import crop_box, decode, scale_views
    from deep_retrieval.retrieval import extraction

    fn = extraction.compiled_fn(lambda x: model(x, training=False))  # resizes each scale itself

    def describe(paths, boxes=None, desc=""):
        out = []
        for i, path in enumerate(paths):
            image = decode(tf.io.read_file(path))
            box = None if boxes is None or np.isnan(boxes[i]).any() else boxes[i]
            if box is not None and crop_keeps_scale:
                (image,) = scale_views(image, longest, (1.0,), box)
            else:
                if box is not None:
                    image = crop_box(image, box)
                (image,) = scale_views(image, longest)
            out.append(np.asarray(fn(image[None]))[0])
        return np.stack(out)

    return describe


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A .keras descriptor model.")
    parser.add_argument("--backbone", help="Instead of --model: this backbone off the shelf.")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--qe", type=int, default=1)
    parser.add_argument("--dba", type=int, default=3)
    args = parser.parse_args()
    if bool(args.model) == bool(args.backbone):
        parser.error("give --model or --backbone")

    import keras

    from deep_retrieval.config import SyntheticConfig
    from deep_retrieval.data import groundtruth, synthetic
    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model, image_size_of
    from deep_retrieval.presets import PRESETS
    from deep_retrieval.retrieval import evaluation, extraction, reranking

    if args.model:
        model = keras.models.load_model(args.model)
        size = image_size_of(model, args.image_size)
    else:
        model = build_descriptor_model(DescriptorConfig(backbone=args.backbone, whitening_dim=None))
        size = args.image_size or PRESETS["demo"]().image_size
    root, name = args.data_root, args.dataset
    if not root:
        root, name = synthetic.ensure_dataset(SyntheticConfig(), progress=False), synthetic.DATASET_NAME
    data = groundtruth.load_dataset(root, name)
    boxes = None
    if any(b is not None for b in data.query_boxes):
        boxes = [[float("nan")] * 4 if b is None else list(b) for b in data.query_boxes]

    def described(describe):
        return describe(data.images, desc="database"), describe(data.queries, boxes, desc="queries")

    def score(db, q):
        result = evaluation.evaluate(evaluation.rank_by_similarity(q, db), data.gnd)
        return {p: round(float(v["map"]), 2) for p, v in result.items()}

    rows = {}
    rows["before"] = score(*described(_legacy_describer(model, size, crop_keeps_scale=False)))
    rows["+crop"] = score(*described(_legacy_describer(model, size, crop_keeps_scale=True)))
    db, q = described(extraction.model_describer(model, size, progress=False))
    rows["+scales"] = score(db, q)
    aqe = reranking.alpha_query_expansion(q, db, args.qe, 0.0)
    dba = reranking.database_augmentation(db, args.dba)
    rows[f"+aqe k={args.qe}"] = score(db, aqe)
    rows[f"+dba k={args.dba}"] = score(dba, q)
    rows["+dba+aqe"] = score(dba, reranking.alpha_query_expansion(q, dba, args.qe, 0.0))
    for label, base in (("+rerank", db), ("+dba+rerank", dba)):
        ranks = evaluation.rerank_ranks(q, base)
        result = evaluation.evaluate(ranks, data.gnd)
        rows[label] = {p: round(float(v["map"]), 2) for p, v in result.items()}
    protocols = list(rows["before"])
    print(f"{'variant':<16}" + "".join(f"{p:>9}" for p in protocols))
    for label, values in rows.items():
        print(f"{label:<16}" + "".join(f"{values[p]:>9.2f}" for p in protocols))
    print(json.dumps({"model": args.model or args.backbone, "image_size": size, "dataset": name, "map": rows}))


if __name__ == "__main__":
    main()
