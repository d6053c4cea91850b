"""Typed configuration (one place; flags sit over it, presets in `presets`).

A leaf module: plain dataclasses and their defaults, validated once when
built, importing neither Keras nor TensorFlow, so that settings can be read,
written and sent to worker processes without loading a framework.
"""

import dataclasses
from typing import Optional, Tuple

PAPER_SCALES = (550 / 800, 1.0, 1050 / 800)
"""DIR's multi-resolution setting: images at 550, 800 and 1050 px for a model
trained at 800 px, as scales relative to the input."""

DEFAULT_ANCHOR_SCALES = (0.25, 0.5, 0.75, 1.0)
"""RPN anchor sides as a share of the feature map's short side: landmarks
fill much of a photograph, and R-MAC's own regions span 0.4 to 1 of the
short side."""

DEFAULT_ANCHOR_RATIOS = (0.5, 1.0, 2.0)
"""RPN anchor aspect ratios ``width / height``."""


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
        regions: regions R-MAC pools: ``"grid"`` (the rigid multi-scale grid)
            or ``"rpn"`` (the proposals of a region proposal network).
        proposals: regions proposed per image by the RPN.
        pre_nms_proposals: best-scored RPN boxes entering non-maximum
            suppression.
        nms_threshold: IoU above which NMS drops the lower-scored proposal.
        anchor_scales: RPN anchor sides as a share of the feature map's short
            side.
        anchor_ratios: RPN anchor aspect ratios (width / height).
        rpn_channels: width of the RPN's 3x3 convolution.
    """

    backbone: str = "resnet101"
    weights: Optional[str] = "imagenet"
    levels: int = 3
    include_global: bool = False
    scales: Tuple[float, ...] = PAPER_SCALES
    whitening_dim: Optional[int] = None
    regions: str = "grid"
    proposals: int = 256
    pre_nms_proposals: int = 1000
    nms_threshold: float = 0.7
    anchor_scales: Tuple[float, ...] = DEFAULT_ANCHOR_SCALES
    anchor_ratios: Tuple[float, ...] = DEFAULT_ANCHOR_RATIOS
    rpn_channels: int = 256

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        self.anchor_scales = tuple(float(s) for s in self.anchor_scales)
        self.anchor_ratios = tuple(float(r) for r in self.anchor_ratios)
        if self.regions not in ("grid", "rpn"):
            raise ValueError(f"`regions` must be 'grid' or 'rpn', got {self.regions!r}.")
        if not 1 <= self.proposals <= self.pre_nms_proposals:
            raise ValueError(
                f"Need 1 <= proposals <= pre_nms_proposals, got {self.proposals} "
                f"and {self.pre_nms_proposals}."
            )
        if not self.anchor_scales or min(self.anchor_scales + self.anchor_ratios) <= 0:
            raise ValueError("`anchor_scales` and `anchor_ratios` must be positive numbers.")
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
    """The built-in landmark dataset (see `deep_retrieval.data.synthetic`).

    Attributes:
        source: ``"photos"`` (views of real photographs from the Debian
            package gcompris-qt-data, one photo per landmark), ``"folder"``
            (views of the photos in ``photos_dir``, one instance each; what
            ``--instances_dir`` sets) or ``"facades"`` (procedural facades;
            no package needed).
        photos_dir: with ``"photos"``, the package's ``rcc/`` folder; with
            ``"folder"``, the folder of photos (searched recursively).
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

    source: str = "photos"
    photos_dir: str = "/usr/share/gcompris-qt/rcc"
    train_landmarks: int = 76
    images_per_landmark: int = 6
    test_landmarks: int = 30
    test_images_per_landmark: int = 5
    distractors: int = 150
    label_noise: float = 0.0
    junk_noise: float = 0.0
    image_width: int = 320
    image_height: int = 240
    seed: int = 0

    def __post_init__(self):
        if self.source not in ("photos", "folder", "facades"):
            raise ValueError(f"`source` must be 'photos', 'folder' or 'facades', got {self.source!r}.")


@dataclasses.dataclass
class TrainConfig:
    """Ranking training (``python -m training.train``); every field is a flag.

    Attributes:
        output_dir: checkpoints, TensorBoard logs, metrics.jsonl, model.keras.
        manifest: training CSV (``image,label[,x0,y0,x1,y1]``); empty means the
            built-in dataset.
        instances_dir: a folder of your own photographs, unlabelled: each is
            one instance, and training and held-out views of them are
            generated as for the built-in dataset (a fifth of the photos,
            at least two, are held out), so the descriptor adapts to a
            collection without labels.
        data_dir: folder the manifest's image paths are relative to (default:
            the manifest's folder).
        allow_outside_data_dir: accept manifest paths outside ``data_dir``.
        eval_root: folder holding ``eval_dataset/`` in the Revisited Oxford
            layout (default with the synthetic data: its held-out split).
        eval_dataset: benchmark name under ``eval_root``.
        image_size: longest image side in pixels (training crops and test).
        margin: triplet ranking margin ``m``.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum).
        learning_rate, momentum: optimizer settings.
        weight_decay: strength ``lambda`` of the weight decay (0: none).
        weight_decay_mode: ``"l2"`` adds ``lambda * w`` to every gradient
            before the optimizer, i.e. ``lambda / 2 ||w||^2`` in the loss, as
            Caffe's ``weight_decay`` (DIR's) does: with SGD momentum ``mu``
            its steady-state pull is ``lr * lambda / (1 - mu)``, 10x Keras's
            decoupled form at ``mu = 0.9``. ``"decoupled"`` is Keras's
            ``weight_decay`` (``w -= lr * lambda * w`` after the update,
            outside the momentum; AdamW for Adam).
        batch_size: triplets per step (global, over all replicas).
        accumulate_steps: split each step's batch into this many
            micro-batches, run one after the other, their gradients summed
            into one update (same result, lower peak memory).
        steps: optimizer steps.
        mine_every: steps between hard-negative mining rounds.
        pool_size: training images embedded per mining round (0 = all).
        num_negatives: hard negatives kept per query (one is drawn per triplet).
        whitening_images: training images whose regions fit the PCA-whitening.
        whitening_power: 0.5 whitens, 0 is plain PCA.
        train_from: name (or name prefix, e.g. ``blocks_11``) of the first
            backbone layer that ranking training updates; the layers before
            it stay frozen and no gradient flows through them. Empty trains
            the whole backbone.
        eval_every: steps between evaluations (0 = only before and after).
        checkpoint_every: steps between checkpoints.
        seed: seeds data order, augmentation, mining and initialisation.
        strategy: ``"default"``, ``"mirrored"`` or ``"multi_worker"``
            (``TF_CONFIG``).
        resume: continue from the latest checkpoint in ``output_dir``.
        rpn_checkpoint: with ``--regions rpn``, RPN weights to use instead of
            training them (``rpn.weights.npz`` of an earlier run, or its
            ``model.keras``); empty trains the RPN (see ``rpn_order``).
        rpn_steps: RPN training steps (on the manifest's boxes, backbone
            frozen).
        rpn_batch_size: images per RPN step.
        rpn_learning_rate: RPN Adam learning rate.
        rpn_anchors_per_image: anchors sampled per image for the RPN loss
            (at most half positive).
        rpn_order: with ``regions="rpn"``: ``"grid_first"`` (DIR, IJCV 2017)
            trains the ranking with the rigid grid, then the RPN on that
            network's frozen features, and the final model pools the RPN's
            proposals; ``"rpn_first"`` trains the RPN on the pretrained
            backbone, then the ranking through its frozen proposals.
        rpn_refresh_steps: with ``rpn_order="rpn_first"``, RPN steps on the
            current backbone at every mining round of the ranking and at its
            end; 0 keeps the RPN as first trained (right for a pretrained
            backbone, whose features move little).
    """

    descriptor: DescriptorConfig = dataclasses.field(default_factory=DescriptorConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    output_dir: str = "runs/demo"
    manifest: str = ""
    instances_dir: str = ""
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
    weight_decay_mode: str = "l2"
    batch_size: int = 64
    accumulate_steps: int = 1
    steps: int = 8000
    mine_every: int = 16
    pool_size: int = 20000
    num_negatives: int = 5
    whitening_images: int = 500
    whitening_power: float = 0.5
    train_from: str = ""
    eval_every: int = 0
    checkpoint_every: int = 500
    seed: int = 0
    strategy: str = "default"
    resume: bool = False
    rpn_checkpoint: str = ""
    rpn_steps: int = 2000
    rpn_batch_size: int = 8
    rpn_learning_rate: float = 1e-3
    rpn_anchors_per_image: int = 256
    rpn_refresh_steps: int = 0
    rpn_order: str = "grid_first"

    def __post_init__(self):
        if self.rpn_order not in ("grid_first", "rpn_first"):
            raise ValueError(f"`rpn_order` must be 'grid_first' or 'rpn_first', got {self.rpn_order!r}.")
        if self.rpn_refresh_steps and self.rpn_order != "rpn_first":
            raise ValueError("`rpn_refresh_steps` re-fits an RPN trained before the ranking: it needs "
                             "`rpn_order='rpn_first'` (with 'grid_first' the RPN is trained last).")
        if self.weight_decay_mode not in ("l2", "decoupled"):
            raise ValueError(f"`weight_decay_mode` must be 'l2' or 'decoupled', got {self.weight_decay_mode!r}.")
        if self.accumulate_steps < 1 or self.batch_size % self.accumulate_steps:
            raise ValueError(f"`accumulate_steps` ({self.accumulate_steps}) must be at least 1 and divide "
                             f"`batch_size` ({self.batch_size}).")


@dataclasses.dataclass
class CleanConfig:
    """Automatic cleaning of a landmark collection (``python -m training.clean``).

    Attributes:
        max_side: images are downscaled to this longest side (pixels) before
            SIFT.
        max_features: SIFT keypoints kept per image (the strongest).
        contrast_threshold: SIFT's contrast threshold (lower finds more
            keypoints in flat, low-contrast images).
        ratio: Lowe's ratio-test threshold for a match.
        transform: geometric model verified by RANSAC: ``"affine"`` or
            ``"homography"``.
        ransac_threshold: RANSAC reprojection error in pixels of the
            downscaled images.
        min_inliers: inliers for a pair to count as verified.
        region_consistency: a verified pair is kept only when its matches
            cover, in both images, the region most of that image's pairs
            agree on (overlap of at least this share of the smaller box;
            `cleaning.consistent_edges`): matches on shared backgrounds or
            objects then stop linking images of different landmarks. 0 keeps
            every verified pair.
        min_component_size: 0 keeps the largest verified group of each label;
            N > 0 keeps every group of at least N images.
        max_pairs: pairs matched exhaustively per label; above it each image
            is matched only with its ``neighbors`` most similar images.
        neighbors: candidate partners per image when ``max_pairs`` is
            exceeded.
        workers: parallel processes (labels run in parallel); 0 = one per CPU.
    """

    max_side: int = 512
    max_features: int = 2000
    contrast_threshold: float = 0.01
    ratio: float = 0.85
    transform: str = "affine"
    ransac_threshold: float = 10.0
    min_inliers: int = 15
    region_consistency: float = 0.5
    min_component_size: int = 0
    max_pairs: int = 2000
    neighbors: int = 20
    workers: int = 0

    def __post_init__(self):
        if self.transform not in ("affine", "homography"):
            raise ValueError(f"`transform` must be 'affine' or 'homography', got {self.transform!r}.")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"`ratio` must be in (0, 1], got {self.ratio}.")
        if not 0 <= self.region_consistency <= 1:
            raise ValueError(f"`region_consistency` must be in [0, 1], got {self.region_consistency}.")
        if self.min_inliers < 3:
            raise ValueError(f"`min_inliers` must be at least 3, got {self.min_inliers}.")
        if self.max_side < 16:
            raise ValueError(f"`max_side` must be at least 16 pixels, got {self.max_side}.")
