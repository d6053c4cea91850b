"""Typed configuration of the descriptor model (one place; flags sit over it)."""

import dataclasses
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
