"""deep-retrieval: Deep Image Retrieval (Gordo et al.) for Keras 3."""

__version__ = "0.1.0"
