"""Imports a published retrieval network (cirtorch or dirtorch in PyTorch,
or the DIR paper's own Caffe release) as a descriptor model: evaluate it
with `training.evaluate`, export it with `export.export_saved_model`, serve
it with `serving.server`.

    python -m export.import_checkpoint --checkpoint Resnet101-AP-GeM --output models/dir-ap-gem.keras
    python -m export.import_checkpoint --checkpoint retrievalSfM120k-resnet101-gem-b80fb85.pth \
        --output models/cirtorch-gem.keras
    python -m export.import_checkpoint --checkpoint dir-caffe-resnet101-rmac --output models/dir-caffe.keras
    python -m export.import_checkpoint --checkpoint deep_retrieval/model.caffemodel \
        --prototxt deep_retrieval/deploy_resnet101.prototxt --output models/dir-caffe.keras

``--checkpoint`` is a file, or a published name: the publisher's file is
downloaded once into ``$KERAS_HOME/deep_retrieval/published`` (resumed if
interrupted, checked against its recorded SHA-256) and imported as the
publisher's test script describes images. The layout is recognised from the
file (see `deep_retrieval.model.published`); the file is read without torch
and without running anything it names. The model is written atomically.
"""

import json
import os

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.published_presets import PUBLISHED


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("checkpoint", None, "A cirtorch (.pth) or dirtorch (.pt) checkpoint file, a DIR Caffe "
                        "model (.caffemodel), or a published name (downloaded into the cache): "
                        f"{', '.join(PUBLISHED)}.")
    flags.DEFINE_string("prototxt", None, "The .caffemodel's network (default: deploy_resnet101_normpython.prototxt "
                        "or deploy_resnet101.prototxt beside it).")
    flags.DEFINE_string("output", None, "The descriptor model to write (.keras).")
    flags.DEFINE_integer("image_size", None, "Longest image side the model describes images at (default: 1024, "
                         "at which cirtorch and dirtorch evaluate Oxford and Paris; 800 for DIR Caffe, its S).")
    flags.DEFINE_list("scales", None, "Relative scales (default: for a name, its publisher's; for a file, "
                      "cirtorch's 1,0.7071,0.5, dirtorch's 1 and DIR Caffe's 0.6875,1,1.3125).")
    flags.DEFINE_string("whitening", None, "Post-hoc whitening to apply when the file holds several "
                        "(cirtorch meta['Lw'] keys such as retrieval-SfM-120k, dirtorch pca keys such as "
                        "Landmarks_clean); 'none' for none. Default: for a name, its publisher's; otherwise dirtorch's "
                        "Landmarks_clean where the file holds it, else the only one.")


def main(argv):
    del argv
    values = flags.FLAGS
    if not values.checkpoint or not values.output:
        raise app.UsageError("--checkpoint and --output are required")
    if not values.output.endswith(".keras"):
        raise app.UsageError("--output must end in .keras")
    from deep_retrieval.io.atomic import atomic_write
    from deep_retrieval.model import published  # heavy imports after --help

    scales = tuple(float(s) for s in values.scales) if values.scales else None
    if values.prototxt and not os.path.exists(values.checkpoint):
        raise app.UsageError("--prototxt goes with a .caffemodel file")
    if not os.path.exists(values.checkpoint) and values.checkpoint not in PUBLISHED:
        raise ValueError(f"{values.checkpoint}: no such file, and not a published name ({', '.join(PUBLISHED)})")
    if os.path.exists(values.checkpoint):
        model, summary = published.import_checkpoint(values.checkpoint, values.image_size, scales,
                                                     values.whitening, values.prototxt)
    else:
        model, summary = published.load_published(values.checkpoint, values.image_size, scales, values.whitening,
                                                   progress=True)
    atomic_write(values.output, model.save, ".keras")
    print(f"{values.output}: {json.dumps(summary)}, descriptor size {model.descriptor_size}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
