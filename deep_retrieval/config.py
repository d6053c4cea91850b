"""Typed configuration (one place; flags sit over it, presets in `presets`).

A leaf module: plain dataclasses and their defaults, validated once when
built, importing neither Keras nor TensorFlow, so that settings can be read,
written and sent to worker processes without loading a framework. Each
field is documented where it is declared (`setting`); that text is its
flag's help.
"""

import dataclasses
from typing import Optional, Tuple


def setting(default, help):
    """A dataclass field with its documentation in ``metadata["help"]``."""
    return dataclasses.field(default=default, metadata={"help": help})


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
    """What defines a DIR descriptor model."""

    backbone: str = setting("resnet101",
        '"resnet101", "resnet50", "vgg16", "efficientnet_lite0", "efficientnet_lite2", "tiny" (a small CNN for '
        'tests), "torchvision_resnet50/101/152" or "torchvision_vgg16" (torchvision\'s layout, for imported '
        'PyTorch models), or "caffe_resnet50/101/152" (MSRA\'s Caffe layout, for the DIR Caffe release).')
    weights: Optional[str] = setting("imagenet",
        '"imagenet" (downloaded by Keras), a local weights file for the backbone, or None (random initialisation).')
    levels: int = setting(3, "R-MAC grid scales L.")
    include_global: bool = setting(False, "also pool the whole feature map as a region.")
    scales: Tuple[float, ...] = setting(PAPER_SCALES,
        "image scales of the multi-resolution descriptor, relative to the input size; the default is DIR's "
        "550/800/1050 for 800 px.")
    whitening_dim: Optional[int] = setting(None,
        "output size of the PCA-whitening layer; None means no whitening layer.")
    whitening_bias: bool = setting(False, "the PCA-whitening layer adds a bias after its projection (the DIR "
                                   "Caffe release's Scale + InnerProduct).")
    regions: str = setting("grid",
        'regions R-MAC pools: "grid" (the rigid multi-scale grid), "rpn" (the proposals of a region proposal '
        'network) or "pixel_grid" (the grid laid on the image in pixels and ROI-pooled, as the DIR Caffe release '
        'does: export.import_checkpoint).')
    proposals: int = setting(256, "regions proposed per image by the RPN.")
    pre_nms_proposals: int = setting(1000, "best-scored RPN boxes entering non-maximum suppression.")
    nms_threshold: float = setting(0.7, "IoU above which NMS drops the lower-scored proposal.")
    anchor_scales: Tuple[float, ...] = setting(DEFAULT_ANCHOR_SCALES,
        "RPN anchor sides as a share of the feature map's short side.")
    anchor_ratios: Tuple[float, ...] = setting(DEFAULT_ANCHOR_RATIOS, "RPN anchor aspect ratios (width / height).")
    rpn_channels: int = setting(256, "width of the RPN's 3x3 convolution.")
    pooling: str = setting("rmac", '"rmac" (DIR\'s R-MAC head), "gem" (GeM pooling, the head of cirtorch '
                           'and dirtorch models, see export.import_checkpoint) or "mac" (global max-pooling in the '
                           'same head: dirtorch\'s Resnet101-TL-MAC).')
    gem_p: float = setting(3.0, "GeM's initial power (pooling gem).")
    normalize_pooled: bool = setting(True, "pooling gem: L2-normalise the pooled vector before fc (cirtorch).")
    fc_dim: Optional[int] = setting(None, "pooling gem: output size of the fully-connected layer after GeM "
                                    "(learned whitening); None for none.")
    multiscale_power: float = setting(1.0, "combination of the scales: 1 sums the L2 descriptors (DIR); p "
                                      "takes their generalised mean of power p (cirtorch, dirtorch).")
    multiscale_epsilon: float = setting(0.0, "with multiscale_power: |v| is clamped to at least this in both "
                                        "powers (dirtorch's 1e-6; 0 for cirtorch).")
    dtype: str = setting("float32", '"float32", or "bfloat16": the backbone computes in bfloat16 (Keras\'s '
                         'mixed_bfloat16 policy, weights kept in float32) while the head, normalisations, whitening '
                         'and sums stay in float32; the descriptor is float32.')
    fold_batch_norm: bool = setting(False, "the backbone's batch norms folded into their convolutions (inference "
                                    "only: deep_retrieval.model.batch_norm_folding; model.for_inference sets it).")
    post_whitening_dim: Optional[int] = setting(None, "size of a whitening P(x - m) applied after the scales "
                                                "are combined, then L2 (cirtorch's Lw, dirtorch's PCA); None "
                                                "for none.")

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        self.anchor_scales = tuple(float(s) for s in self.anchor_scales)
        self.anchor_ratios = tuple(float(r) for r in self.anchor_ratios)
        if self.regions not in ("grid", "rpn", "pixel_grid"):
            raise ValueError(f"`regions` must be 'grid', 'rpn' or 'pixel_grid', got {self.regions!r}.")
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
        if self.pooling not in ("rmac", "gem", "mac"):
            raise ValueError(f"`pooling` must be 'rmac', 'gem' or 'mac', got {self.pooling!r}.")
        if self.pooling != "rmac" and (self.regions != "grid" or self.whitening_dim is not None):
            raise ValueError(f"{self.pooling} pools the whole map: `regions` and `whitening_dim` are R-MAC's "
                             "(use fc_dim).")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`dtype` must be 'float32' or 'bfloat16', got {self.dtype!r}.")
        if self.multiscale_power <= 0:
            raise ValueError(f"`multiscale_power` must be positive, got {self.multiscale_power}.")
        if self.whitening_dim is not None and self.whitening_dim < 1:
            raise ValueError(
                f"`whitening_dim` must be positive or None, got {self.whitening_dim}."
            )


@dataclasses.dataclass
class SyntheticConfig:
    """The built-in landmark dataset (see `deep_retrieval.data.synthetic`)."""

    source: str = setting("photos",
        '"photos" (views of real photographs from the Debian packages gcompris-qt-data, tuxpaint-stamps-default and '
        'tuxpaint-data, one photo per landmark), "folder" (views of the photos in photos_dir, one instance each; what '
        '--instances_dir sets) or "facades" (procedural facades; no package needed).')
    photos_dir: str = setting("/usr/share/gcompris-qt/rcc",
        "with \"photos\", GCompris's rcc/ folder; with \"folder\", the folder of photos (searched recursively).")
    tuxpaint_dir: str = setting("/usr/share/tuxpaint", "Tux Paint's data folder (its stamps/ and templates/).")
    renderer: str = setting("photo_view",
        'what renders the views of the training photos and of the held-out "synthetic" split: "photo_view" (the '
        'photo fills much of the frame, warped by its corners, crops of other photos around and over it), "camera" '
        '(a pinhole camera photographs it as a turned plane, often small or cut by the frame, among other photos, '
        'behind poles and foreground, sensor noise, JPEG) or "mixed" (either, drawn per view). The places are '
        'rendered by both, as the "scenes" and "scenes_camera" validation splits.')
    surroundings: int = setting(40,
        'with "photos": training-source photographs (not cut-outs) set aside as the surroundings of training views '
        '(backgrounds, occluders, the backdrops of cut-outs) and never used as instances, so that no training view '
        'shows another instance around its own, which would make it a false negative of the queries of that instance '
        '(0: the surroundings are the other training instances).')
    train_landmarks: int = setting(0, "landmarks in the training split (0: every photo not held out).")
    images_per_landmark: int = setting(6, "photographs of each training landmark.")
    test_landmarks: int = setting(30, "landmarks of the held-out query/database split drawn from the training "
                                  "sources (disjoint from training).")
    test_images_per_landmark: int = setting(5, "database photographs of each test landmark.")
    distractors: int = setting(150, "database images with no landmark (held-out split).")
    scene_images_per_landmark: int = setting(5,
        "database views of each landmark of the scenes validation splits (photographed places from other sources "
        "than training, by each renderer).")
    scene_distractors: int = setting(500, "landmark-free database images of each scenes split (0: no scenes "
                                     "splits).")
    label_noise: float = setting(0.0, "share of training images given a wrong label.")
    junk_noise: float = setting(0.0,
        "share of training images replaced by landmark-free junk that keeps a landmark label.")
    image_width: int = setting(320, "photograph size in pixels.")
    image_height: int = setting(240, "photograph size in pixels.")
    seed: int = setting(0, "everything is a deterministic function of the configuration.")

    def __post_init__(self):
        if self.source not in ("photos", "folder", "facades"):
            raise ValueError(f"`source` must be 'photos', 'folder' or 'facades', got {self.source!r}.")
        if self.surroundings < 0:
            raise ValueError(f"`surroundings` must be 0 or more, got {self.surroundings}.")
        if self.renderer not in ("photo_view", "camera", "mixed"):
            raise ValueError(f"`renderer` must be 'photo_view', 'camera' or 'mixed', got {self.renderer!r}.")


@dataclasses.dataclass
class TrainConfig:
    """Ranking training (``python -m training.train``); every field is a flag."""

    descriptor: DescriptorConfig = dataclasses.field(default_factory=DescriptorConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    output_dir: str = setting("runs/demo", "checkpoints, TensorBoard logs, metrics.jsonl, model.keras.")
    manifest: str = setting("", "training CSV (image,label[,x0,y0,x1,y1]); empty means the built-in dataset.")
    instances_dir: str = setting("",
        "a folder of your own photographs, unlabelled: each is one instance, and training and held-out views of them "
        "are generated as for the built-in dataset (a fifth of the photos, at least two, are held out), so the "
        "descriptor adapts to a collection without labels.")
    data_dir: str = setting("", "folder the manifest's image paths are relative to (default: the manifest's folder).")
    allow_outside_data_dir: bool = setting(False, "accept manifest paths outside data_dir.")
    eval_root: str = setting("",
        "folder holding eval_dataset/ in the Revisited Oxford layout (default with the synthetic data: its held-out "
        "split).")
    eval_dataset: str = setting("", "benchmark name under eval_root.")
    image_size: int = setting(800, "longest image side in pixels (training crops and test).")
    margin: float = setting(0.1, "triplet ranking margin m.")
    optimizer: str = setting("sgd", '"adam" or "sgd" (with momentum).')
    learning_rate: float = setting(1e-3, "optimizer settings.")
    momentum: float = setting(0.9, "optimizer settings.")
    weight_decay: float = setting(5e-5, "strength lambda of the weight decay (0: none).")
    weight_decay_mode: str = setting("l2",
        "\"l2\" adds lambda * w to every gradient before the optimizer, i.e. lambda / 2 ||w||^2 in the loss, as "
        "Caffe's weight_decay (DIR's) does: with SGD momentum mu its steady-state pull is lr * lambda / (1 - mu), 10x "
        "Keras's decoupled form at mu = 0.9. \"decoupled\" is Keras's weight_decay (w -= lr * lambda * w after the "
        "update, outside the momentum; AdamW for Adam).")
    l2_sp: float = setting(0.0,
        "strength beta of L2-SP (Li et al., ICML 2018): adds beta / 2 ||w - w0||^2 to the loss, w0 the trained weights "
        "when ranking training starts (the pretrained layers and the fitted whitening), so that the descriptor "
        "stays near the model it starts from (0: none).")
    distill: float = setting(0.0,
        "strength gamma of distillation toward the initial descriptor: adds gamma times the mean over a step's "
        "images of ||d(x) - d0(x)||^2, d0 the descriptor of the model training starts from, so that ranking the "
        "training views does not undo what the pretrained descriptor told apart (0: none).")
    batch_size: int = setting(64, "triplets per step (global, over all replicas).")
    accumulate_steps: int = setting(1,
        "split each step's batch into this many micro-batches, run one after the other, their gradients averaged into "
        "one update (same result, lower peak memory; one replica).")
    steps: int = setting(8000, "optimizer steps (a multiple of mine_every).")
    mine_every: int = setting(16, "steps between hard-negative mining rounds (one round is one Keras epoch).")
    pool_size: int = setting(20000, "training images embedded per mining round (0 = all).")
    num_negatives: int = setting(5, "hard negatives kept per query (one is drawn per triplet).")
    whitening_images: int = setting(500, "training images whose regions fit the PCA-whitening.")
    whitening_power: float = setting(0.5, "0.5 whitens, 0 is plain PCA.")
    cache_features: bool = setting(True,
        "with train_from (one image size, grid regions): compute the frozen layers' output once per image and "
        "train, mine and evaluate from it (deep_retrieval.ranking.frozen_trunk; training images are then used as "
        "they are, without random crop and colour jitter). False recomputes them at every step, with that "
        "augmentation.")
    train_from: str = setting("",
        "name (or name prefix, e.g. blocks_11) of the first backbone layer that ranking training updates; the layers "
        "before it stay frozen and no gradient flows through them. Empty trains the whole backbone.")
    eval_every: int = setting(0,
        "steps between evaluations (0 = only before and after), at the end of the mining round that reaches each "
        "multiple.")
    checkpoint_every: int = setting(500,
        "steps between backups of model and optimizer, at the end of the mining round that reaches each multiple.")
    seed: int = setting(0, "seeds data order, augmentation, mining and initialisation.")
    strategy: str = setting("default", '"default", "mirrored" or "multi_worker" (TF_CONFIG).')
    resume: bool = setting(False, "continue from the backup in output_dir.")
    rpn_checkpoint: str = setting("",
        "with --regions rpn, RPN weights to use instead of training them (rpn.weights.npz of an earlier run, or its "
        "model.keras); empty trains the RPN (see rpn_order).")
    rpn_steps: int = setting(2000, "RPN training steps (on the manifest's boxes, backbone frozen).")
    rpn_batch_size: int = setting(8, "images per RPN step.")
    rpn_learning_rate: float = setting(1e-3, "RPN Adam learning rate.")
    rpn_anchors_per_image: int = setting(256, "anchors sampled per image for the RPN loss (at most half positive).")
    rpn_refresh_steps: int = setting(0,
        'with rpn_order="rpn_first", RPN steps on the current backbone at every mining round of the ranking and at its'
        ' end; 0 keeps the RPN as first trained (right for a pretrained backbone, whose features move little).')
    rpn_order: str = setting("grid_first",
        "with regions=\"rpn\": \"grid_first\" (DIR, IJCV 2017) trains the ranking with the rigid grid, then the RPN on"
        " that network's frozen features, and the final model pools the RPN's proposals; \"rpn_first\" trains the RPN "
        "on the pretrained backbone, then the ranking through its frozen proposals.")

    def __post_init__(self):
        if self.rpn_order not in ("grid_first", "rpn_first"):
            raise ValueError(f"`rpn_order` must be 'grid_first' or 'rpn_first', got {self.rpn_order!r}.")
        if self.rpn_refresh_steps and self.rpn_order != "rpn_first":
            raise ValueError("`rpn_refresh_steps` re-fits an RPN trained before the ranking: it needs "
                             "`rpn_order='rpn_first'` (with 'grid_first' the RPN is trained last).")
        if self.weight_decay_mode not in ("l2", "decoupled"):
            raise ValueError(f"`weight_decay_mode` must be 'l2' or 'decoupled', got {self.weight_decay_mode!r}.")
        if self.descriptor.fold_batch_norm:
            raise ValueError("`fold_batch_norm` is for inference (extraction and export fold the trained model's "
                             "batch norms themselves); training keeps them.")
        if self.mine_every < 1 or self.steps % self.mine_every:
            raise ValueError(f"`steps` ({self.steps}) must be a multiple of `mine_every` ({self.mine_every}): "
                             "training runs whole mining rounds.")
        if self.accumulate_steps < 1 or self.batch_size % self.accumulate_steps:
            raise ValueError(f"`accumulate_steps` ({self.accumulate_steps}) must be at least 1 and divide "
                             f"`batch_size` ({self.batch_size}).")


@dataclasses.dataclass
class CleanConfig:
    """Automatic cleaning of a landmark collection (``python -m training.clean``)."""

    max_side: int = setting(512, "images are downscaled to this longest side (pixels) before SIFT.")
    max_features: int = setting(2000, "SIFT keypoints kept per image (the strongest).")
    contrast_threshold: float = setting(0.01,
        "SIFT's contrast threshold (lower finds more keypoints in flat, low-contrast images).")
    ratio: float = setting(0.85, "Lowe's ratio-test threshold for a match.")
    transform: str = setting("affine", 'geometric model verified by RANSAC: "affine" or "homography".')
    ransac_threshold: float = setting(10.0, "RANSAC reprojection error in pixels of the downscaled images.")
    min_inliers: int = setting(15, "inliers for a pair to count as verified.")
    region_consistency: float = setting(0.5,
        "a verified pair is kept only when its matches cover, in both images, the region most of that image's pairs "
        "agree on (overlap of at least this share of the smaller box; `cleaning.consistent_edges`): matches on shared "
        "backgrounds or objects then stop linking images of different landmarks. 0 keeps every verified pair.")
    min_component_size: int = setting(0,
        "0 keeps the largest verified group of each label; N > 0 keeps every group of at least N images.")
    max_pairs: int = setting(2000,
        "pairs matched exhaustively per label; above it each image is matched only with its neighbors most similar "
        "images.")
    neighbors: int = setting(20, "candidate partners per image when max_pairs is exceeded.")
    workers: int = setting(0, "parallel processes (labels run in parallel); 0 = one per CPU.")

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
