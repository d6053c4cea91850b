"""Retrieval with descriptors: extraction over image lists, evaluation
(Revisited Oxford/Paris mAP), descriptor files, re-ranking (αQE, DBA,
SuperGlobal) and the search index, exact or Faiss, in memory or on disk."""
