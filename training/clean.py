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

import os
import sys

from absl import app, flags

from deep_retrieval.files import atomic_csv

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
    from deep_retrieval.config import CleanConfig
    from training import config_flags

    try:
        config = config_flags.dataclass_from_flags(CleanConfig)
        summary = run(FLAGS.manifest, FLAGS.data_dir, FLAGS.output, config,
                      FLAGS.allow_outside_data_dir, FLAGS.progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


def run(manifest_path, data_dir, output, config, allow_outside=False, progress=True):
    """Cleans ``manifest_path`` into ``output``; returns a printable summary."""
    from deep_retrieval import cleaning
    from deep_retrieval.data import manifest as manifest_lib

    data_dir = data_dir or os.path.dirname(os.path.abspath(manifest_path))
    manifest = manifest_lib.read_manifest(manifest_path, data_dir, allow_outside, check_images=False)
    frame = manifest.frame
    groups = {}
    for i, row in enumerate(frame.itertuples(index=False)):
        groups.setdefault(str(row.label), []).append((i, row.path))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    journal = cleaning.journal_path(output, config, manifest_path)
    results = cleaning.clean_manifest(groups, config, journal, progress)

    decisions = cleaning.decisions_frame(manifest, results)
    kept = decisions[decisions["kept"]]
    report = cleaning.report_frame(decisions)
    atomic_csv(output, kept[["image", "label", "x0", "y0", "x1", "y1"]])
    atomic_csv(f"{output}.decisions.csv", decisions)
    atomic_csv(f"{output}.report.csv", report)
    os.remove(journal)
    reasons = decisions.loc[~decisions["kept"], "reason"].str.replace(r"\(.*", "", regex=True)
    reasons = reasons.str.replace(r"group of \d+ images, not the kept group of \d+", "group, not the kept one",
                                  regex=True)
    lines = [f"{len(decisions)} images in, {len(kept)} kept with a box, "
             f"{len(decisions) - len(kept)} dropped, over {len(report)} labels "
             f"({int((report['kept'] >= 2).sum())} keep at least 2 images)"]
    for reason, count in reasons.value_counts().items():
        lines.append(f"  dropped: {count:5d}  {reason.strip()}")
    lines.append(f"wrote {output}, {output}.decisions.csv, {output}.report.csv")
    return "\n".join(lines)


if __name__ == "__main__":
    define_flags()
    app.run(main)
