"""Keras 3 layers of the DIR descriptor (all `keras.ops`, every backend)."""

from deep_retrieval.layers.box_max_pooling import BoxMaxPooling
from deep_retrieval.layers.gem import GeM
from deep_retrieval.layers.gem_pooling import GeMPooling
from deep_retrieval.layers.image_preprocessing import ImagePreprocessing
from deep_retrieval.layers.l2_normalization import L2Normalization
from deep_retrieval.layers.multi_resolution import PAPER_SCALES, MultiResolution
from deep_retrieval.layers.pca_whitening import PCAWhitening
from deep_retrieval.layers.pixel_grid_max_pooling import PixelGridMaxPooling
from deep_retrieval.layers.region_max_pooling import RegionMaxPooling
from deep_retrieval.layers.region_proposal_network import RegionProposalNetwork
from deep_retrieval.layers.region_sum import RegionSum
from deep_retrieval.layers.rmac import RMAC

__all__ = [
    "BoxMaxPooling",
    "GeM",
    "GeMPooling",
    "ImagePreprocessing",
    "L2Normalization",
    "MultiResolution",
    "PAPER_SCALES",
    "PCAWhitening",
    "PixelGridMaxPooling",
    "RMAC",
    "RegionMaxPooling",
    "RegionProposalNetwork",
    "RegionSum",
]
