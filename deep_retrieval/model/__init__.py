"""The DIR descriptor model (`descriptor_model`), its whitening and
batch-norm folding, and the published PyTorch networks as descriptor models
(`published`).

The names below are the package's public face, as the README teaches them.
"""

from deep_retrieval.config import DescriptorConfig
from deep_retrieval.model.descriptor_model import (
                                                   DescriptorModel,
                                                   build_descriptor_model,
                                                   for_inference,
                                                   load_descriptor_model,
)
from deep_retrieval.model.published import import_checkpoint, load_published

__all__ = ["DescriptorConfig", "DescriptorModel", "build_descriptor_model", "for_inference", "import_checkpoint",
           "load_descriptor_model", "load_published"]
