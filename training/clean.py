r"""Cleans a noisy landmark training manifest automatically.

    python -m training.clean --manifest noisy.csv --data_dir DIR --output clean.csv

Per label: SIFT on downscaled images, ratio-test matching, RANSAC
verification (``--transform affine|homography``, ``--min_inliers``), the
graph of verified pairs, and its largest connected component kept (or every
component of at least ``--min_component_size`` images). Each kept image gets
the landmark's box, estimated from the verified matches (see
`deep_retrieval.cleaning`). Labels run in parallel processes (``--workers``).

Writes ``--output`` (``image,label,x0,y0,x1,y1``: the kept images and their
boxes, ready for ``python -m training.train --manifest``), and beside it
``<output>.decisions.csv`` (every input row: kept or the reason it was
dropped, inliers, group size, box) and ``<output>.report.csv`` (per label:
images in, kept, dropped). An interrupted run resumes where it stopped when
run again with the same settings.
"""


from absl import app, flags

from deep_retrieval import cli

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    from deep_retrieval.config import CleanConfig
    from training import config_flags

    flags.DEFINE_string("manifest", None, "Noisy manifest CSV (image,label[,x0,y0,x1,y1]).")
    flags.DEFINE_string("data_dir", None, "Folder the image paths are relative to (default: the CSV's).")
    flags.DEFINE_string("output", None, "Cleaned manifest CSV to write.")
    flags.DEFINE_boolean("allow_outside_data_dir", False, "Accept image paths outside --data_dir.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")
    config_flags.define_dataclass_flags(CleanConfig)
    flags.adopt_module_key_flags(config_flags)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in ("manifest", "output"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    from deep_retrieval.cleaning import runner
    from deep_retrieval.config import CleanConfig
    from training import config_flags

    config = config_flags.dataclass_from_flags(CleanConfig)
    summary = runner.run(FLAGS.manifest, FLAGS.data_dir, FLAGS.output, config,
                         FLAGS.allow_outside_data_dir, FLAGS.progress)
    print(summary)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
