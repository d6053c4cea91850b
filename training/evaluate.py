r"""Runs a retrieval benchmark end to end and prints mAP and mP@1/5/10.

    python -m training.evaluate --data_root data --dataset roxford5k \
        --model runs/demo/model.keras [--qe 1 --qe_alpha 0 --dba 20 | --rerank] [--output_json results.json]
    python -m training.evaluate --backbone efficientnet_lite0 --weights imagenet
    python -m training.evaluate --dataset roxford5k --download --model models/dir-ap-gem.keras

Without ``--data_root`` it scores the built-in validation splits that
``python -m training.train`` evaluates on and selects with: ``scenes`` and
``scenes_camera`` (photographed places from other packages than any
training photo among landmark-free views, rendered by ``photo_view`` and by
the camera renderer) and ``synthetic`` (held-out photos of the training
sources); all of them without ``--dataset``, or the one it names. Without
``--model``, ``--backbone`` (and ``--weights``) build the off-the-shelf model:
that backbone and plain R-MAC (multi-resolution, no whitening, no training),
so a trained model can be compared with its starting point.

``--data_root/--dataset`` is a folder in the Revisited Oxford layout
(``NAME/jpg/``, ``NAME/gnd_NAME.pkl``); Revisited ground truth gives the
Easy/Medium/Hard protocols, the original Oxford/Paris ground truth
(good/ok/junk) the classic one, and Holidays-style ground truth (``ok`` only)
a single protocol. Queries are cropped to their box, keeping the image's
scale. ``--model`` is a ``.keras`` descriptor model or an exported SavedModel
folder (its ``serving_default`` and ``crops`` signatures are used on the
encoded files, as TF Serving would run them).

``--download`` first fetches ``--dataset`` (roxford5k, rparis6k, oxford5k,
paris6k, holidays) from its publishers into ``--data_root`` (default
``$KERAS_HOME/deep_retrieval/datasets``) unless it is there: resumable, the
archives unpacked refusing links and members outside the folder (see
`deep_retrieval.data.benchmark_downloads`). Without ``--model`` or
``--backbone`` it only downloads.
"""

import json
import os

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.io.atomic import atomic_text

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("data_root", None, "Folder holding the dataset folder.")
    flags.DEFINE_string("dataset", None, "Dataset name (roxford5k, rparis6k, holidays, ...) under --data_root; "
                        "without --data_root 'scenes', 'scenes_camera' or 'synthetic' names one built-in split "
                        "(default: all three).")
    flags.DEFINE_string("model", None, "A .keras descriptor model or a SavedModel folder.")
    flags.DEFINE_string("backbone", None, "Without --model: evaluate this backbone with plain R-MAC, "
                        "untrained (efficientnet_lite0, efficientnet_lite2, resnet101, resnet50, vgg16, tiny).")
    flags.DEFINE_string("weights", "imagenet", "With --backbone: 'imagenet', a weights file, or 'none'.")
    flags.DEFINE_integer("image_size", None, "Longest image side of a .keras model (default: the one it "
                         "carries; a SavedModel resizes inside its graph); with --backbone, default the "
                         "demo preset's.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Run a .keras model's backbone in this precision "
                      "(default: the model's own; bfloat16 keeps the head, whitening and sums in float32).")
    flags.DEFINE_integer("qe", 0, "αQE: expand each query with its top-k results (0: off).")
    flags.DEFINE_float("qe_alpha", 3.0, "αQE exponent.")
    flags.DEFINE_integer("dba", 0, "Database-side augmentation with the top-k neighbours (0: off).")
    flags.DEFINE_boolean("rerank", False, "SuperGlobal re-ranking of each query's top 400 with global "
                         "descriptors (M=400, K=9, beta=0.15 as published); after --dba/--qe if given.")
    flags.DEFINE_string("output_json", None, "Write {protocol: {map, mp@1, mp@5, mp@10}} here (percent); "
                        "{dataset: {protocol: ...}} for the built-in splits.")
    flags.DEFINE_boolean("download", False, "Fetch --dataset (roxford5k, rparis6k, oxford5k, paris6k, holidays) "
                         "from its publishers into --data_root first, unless it is there; default --data_root "
                         "$KERAS_HOME/deep_retrieval/datasets. Without --model/--backbone, only download.")
    flags.DEFINE_boolean("progress", True, "Show progress bars.")


def off_the_shelf(backbone, weights="imagenet", image_size=None, progress=True):
    """The untrained model: ``backbone`` and plain multi-resolution R-MAC."""
    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
    from deep_retrieval.retrieval import extraction

    config = DescriptorConfig(backbone=backbone, weights=weights, whitening_dim=None)
    return extraction.model_describer(build_descriptor_model(config), image_size, progress=progress)


def run(data_root, dataset, model_path, image_size=None, qe=0, qe_alpha=3.0, dba=0, progress=True,
        backbone=None, weights="imagenet", rerank=False, dtype=None):
    """Extracts, ranks and scores; returns `evaluation.evaluate`'s dict (percent).

    ``model_path`` None with ``backbone`` set scores `off_the_shelf` instead.
    """
    from deep_retrieval.data import groundtruth
    from deep_retrieval.retrieval import extraction

    data = groundtruth.load_dataset(data_root, dataset)
    if model_path:
        describe = extraction.describer(model_path, image_size, progress, dtype)
    else:
        describe = off_the_shelf(backbone, weights, image_size or _demo_image_size(), progress)
    return extraction.evaluate_model(describe, data, qe, qe_alpha, dba, rerank)


def _demo_image_size():
    from deep_retrieval.presets import PRESETS

    return PRESETS["demo"]().image_size


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.download:
        if not FLAGS.dataset:
            raise app.UsageError("--download needs --dataset (roxford5k, rparis6k, oxford5k, paris6k, holidays)")
        from deep_retrieval.data import benchmark_downloads
        from deep_retrieval.io.download import cache_dir

        FLAGS.data_root = FLAGS.data_root or cache_dir("datasets")
        folder = benchmark_downloads.download_benchmark(FLAGS.dataset, FLAGS.data_root, FLAGS.progress)
        print(f"dataset: {folder}")
        if not (FLAGS.model or FLAGS.backbone):
            return 0
    if bool(FLAGS.model) == bool(FLAGS.backbone):
        raise app.UsageError("give either --model or --backbone (the off-the-shelf model)")
    from deep_retrieval.data import synthetic
    from deep_retrieval.retrieval import evaluation

    data_root, dataset = FLAGS.data_root, FLAGS.dataset
    built_in_names = (*synthetic.SCENE_SPLITS, synthetic.DATASET_NAME)
    built_in = not data_root and dataset in (None,) + built_in_names
    if not built_in and not (data_root and dataset):
        raise app.UsageError(f"--data_root and --dataset go together; without a path only --dataset "
                             f"{' or '.join(built_in_names)} (or neither) names a built-in split")
    weights = None if FLAGS.weights.lower() in ("", "none") else FLAGS.weights
    names = [dataset]
    if built_in:
        from deep_retrieval.config import SyntheticConfig

        data_root = synthetic.ensure_dataset(SyntheticConfig(), progress=FLAGS.progress)
        names = [dataset] if dataset else synthetic.benchmarks(data_root)
    if FLAGS.backbone and not FLAGS.image_size:
        print(f"image size: {_demo_image_size()} px (the demo preset's; set --image_size)")
    results = {}
    for name in names:
        if built_in:
            print(f"dataset: the built-in {name} split, {os.path.join(data_root, name)}")
        results[name] = run(data_root, name, FLAGS.model, FLAGS.image_size, FLAGS.qe,
                            FLAGS.qe_alpha, FLAGS.dba, FLAGS.progress, FLAGS.backbone, weights, FLAGS.rerank,
                            FLAGS.dtype)
        print(evaluation.format_table(results[name]))
    if FLAGS.output_json:
        atomic_text(FLAGS.output_json, json.dumps(results if len(names) > 1 else results[names[0]], indent=1))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
