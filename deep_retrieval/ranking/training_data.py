"""Where training reads from: the manifest (or the built-in dataset,
generated on first use) and the evaluation benchmark, resolved once."""

import dataclasses
import os

from deep_retrieval.data import groundtruth, synthetic
from deep_retrieval.data import manifest as manifest_lib
from deep_retrieval.data.images import scaled_shape


@dataclasses.dataclass
class TrainingData:
    """Resolved training and evaluation inputs."""

    manifest: manifest_lib.Manifest
    eval_datasets: list
    """The validation splits, which together select the model (`selection`)."""


def resolve_data(config, progress=True):
    """Reads the manifest (generating the built-in dataset if none is given)
    and the evaluation benchmarks: ``--eval_dataset`` under ``--eval_root``,
    or the built-in data's own (`synthetic.benchmarks`, validation first)."""
    manifest_path, data_dir = config.manifest, config.data_dir
    eval_root, eval_name = config.eval_root, config.eval_dataset
    names = []
    if manifest_path and config.instances_dir:
        raise ValueError("give --manifest or --instances_dir, not both")
    if not manifest_path:
        source = config.synthetic
        if config.instances_dir:
            source = dataclasses.replace(
                source, source="folder", photos_dir=os.path.abspath(config.instances_dir)
            )
        root = synthetic.ensure_dataset(source, progress=progress)
        manifest_path, data_dir = os.path.join(root, "train.csv"), root
        if not eval_root:
            eval_root, names = root, synthetic.benchmarks(root)
    data_dir = data_dir or os.path.dirname(os.path.abspath(manifest_path))
    manifest = manifest_lib.read_manifest(
        manifest_path, data_dir, allow_outside=config.allow_outside_data_dir
    )
    if len(manifest.frame) < 2:
        raise ValueError(f"{manifest_path}: no usable training images ({manifest.summary()}).")
    if eval_name:
        names = [eval_name]
    datasets = [groundtruth.load_dataset(eval_root, name) for name in names] if eval_root else []
    return TrainingData(manifest, datasets)


def common_size(frame, longest):
    """The ``(height, width)`` every image of ``frame`` has at ``longest``
    (`scaled_shape`), or None when they differ."""
    sizes = {scaled_shape(h, w, longest) for h, w in zip(frame["height"], frame["width"])}
    return sizes.pop() if len(sizes) == 1 else None
