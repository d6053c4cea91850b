"""Typed configuration of the descriptor model (one place; flags sit over it)."""

import dataclasses
import json
import os
from typing import Optional, Tuple

from deep_retrieval.layers.multi_resolution import PAPER_SCALES


@dataclasses.dataclass
class DescriptorConfig:
    """What defines a DIR descriptor model.

    Attributes:
        backbone: ``"resnet101"``, ``"resnet50"``, ``"vgg16"`` or ``"tiny"``
            (a small CNN for tests and the CPU demo).
        weights: ``"imagenet"`` (downloaded by Keras), a local weights file
            for the backbone, or ``None`` (random initialisation).
        levels: R-MAC grid scales ``L``.
        include_global: also pool the whole feature map as a region.
        scales: image scales of the multi-resolution descriptor, relative to
            the input size; the default is DIR's 550/800/1050 for 800 px.
        whitening_dim: output size of the PCA-whitening layer; ``None`` means
            no whitening layer.
    """

    backbone: str = "resnet101"
    weights: Optional[str] = "imagenet"
    levels: int = 3
    include_global: bool = False
    scales: Tuple[float, ...] = PAPER_SCALES
    whitening_dim: Optional[int] = None

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        if self.levels < 1:
            raise ValueError(f"`levels` must be >= 1, got {self.levels}.")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"`scales` must be positive, got {self.scales}.")
        if self.whitening_dim is not None and self.whitening_dim < 1:
            raise ValueError(
                f"`whitening_dim` must be positive or None, got {self.whitening_dim}."
            )


@dataclasses.dataclass
class SyntheticConfig:
    """The built-in synthetic landmark dataset (see `deep_retrieval.data.synthetic`).

    Attributes:
        train_landmarks: landmarks in the training split.
        images_per_landmark: photographs of each training landmark.
        test_landmarks: landmarks of the held-out query/database split
            (disjoint from training).
        test_images_per_landmark: database photographs of each test landmark.
        distractors: database images with no landmark (held-out split).
        label_noise: share of training images given a wrong label.
        junk_noise: share of training images replaced by landmark-free junk
            that keeps a landmark label.
        image_width, image_height: photograph size in pixels.
        seed: everything is a deterministic function of the configuration.
    """

    train_landmarks: int = 60
    images_per_landmark: int = 6
    test_landmarks: int = 20
    test_images_per_landmark: int = 6
    distractors: int = 80
    label_noise: float = 0.0
    junk_noise: float = 0.0
    image_width: int = 320
    image_height: int = 240
    seed: int = 0


@dataclasses.dataclass
class TrainConfig:
    """Ranking training (``python -m training.train``); every field is a flag.

    Attributes:
        output_dir: checkpoints, TensorBoard logs, metrics.jsonl, model.keras.
        manifest: training CSV (``image,label[,x0,y0,x1,y1]``); empty means the
            built-in synthetic dataset.
        data_dir: folder the manifest's image paths are relative to (default:
            the manifest's folder).
        allow_outside_data_dir: accept manifest paths outside ``data_dir``.
        eval_root: folder holding ``eval_dataset/`` in the Revisited Oxford
            layout (default with the synthetic data: its held-out split).
        eval_dataset: benchmark name under ``eval_root``.
        image_size: longest image side in pixels (training crops and test).
        margin: triplet ranking margin ``m``.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum).
        learning_rate, momentum, weight_decay: optimizer settings.
        batch_size: triplets per step (global, over all replicas).
        steps: optimizer steps.
        mine_every: steps between hard-negative mining rounds.
        pool_size: training images embedded per mining round (0 = all).
        num_negatives: hard negatives kept per query (one is drawn per triplet).
        whitening_images: training images whose regions fit the PCA-whitening.
        whitening_power: 0.5 whitens, 0 is plain PCA.
        eval_every: steps between evaluations (0 = only before and after).
        checkpoint_every: steps between checkpoints.
        seed: seeds data order, augmentation, mining and initialisation.
        strategy: ``"default"``, ``"mirrored"`` or ``"multi_worker"``
            (``TF_CONFIG``).
        resume: continue from the latest checkpoint in ``output_dir``.
    """

    descriptor: DescriptorConfig = dataclasses.field(default_factory=DescriptorConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    output_dir: str = "runs/demo"
    manifest: str = ""
    data_dir: str = ""
    allow_outside_data_dir: bool = False
    eval_root: str = ""
    eval_dataset: str = ""
    image_size: int = 800
    margin: float = 0.1
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    batch_size: int = 64
    steps: int = 8000
    mine_every: int = 16
    pool_size: int = 20000
    num_negatives: int = 5
    whitening_images: int = 500
    whitening_power: float = 0.5
    eval_every: int = 0
    checkpoint_every: int = 500
    seed: int = 0
    strategy: str = "default"
    resume: bool = False


def _demo():
    # Trained from scratch (no pretrained weights on a fresh machine), so the
    # negative of each triplet is drawn among the 30 nearest other labels
    # rather than the very hardest few: with the hardest negatives the
    # randomly initialised network collapses (every descriptor alike, the
    # loss stuck at the margin).
    return TrainConfig(
        descriptor=DescriptorConfig(
            backbone="tiny", weights=None, levels=3, whitening_dim=128
        ),
        output_dir="runs/demo",
        image_size=160,
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.0,
        batch_size=16,
        steps=600,
        mine_every=50,
        pool_size=0,
        num_negatives=30,
        whitening_images=200,
        eval_every=0,
        checkpoint_every=100,
    )


def _paper():
    # DIR (ECCV 2016, IJCV 2017) as published: ResNet-101 from ImageNet,
    # 800 px, margin 0.1, multi-resolution test, whitening kept at 2048 D.
    # The optimisation values are those reported as far as we know them.
    return TrainConfig(
        descriptor=DescriptorConfig(
            backbone="resnet101", weights="imagenet", levels=3, whitening_dim=2048
        ),
        output_dir="runs/paper",
        image_size=800,
        optimizer="sgd",
        learning_rate=1e-3,
        momentum=0.9,
        weight_decay=5e-5,
        batch_size=64,
        steps=8000,
        mine_every=16,
        pool_size=20000,
        eval_every=1000,
        checkpoint_every=500,
    )


PRESETS = {"demo": _demo, "paper": _paper}


def recorded_image_size(model_path, default=1024):
    """The image size recorded with a model: an export's
    ``assets.extra/model_info.json``, or the ``config.json`` a training run
    writes beside its ``model.keras``; ``default`` when neither exists."""
    for path in (
        os.path.join(model_path, "assets.extra", "model_info.json"),
        os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json"),
    ):
        if os.path.isfile(path):
            with open(path) as f:
                return int(json.load(f)["image_size"])
    return default
