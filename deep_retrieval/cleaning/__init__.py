"""Automatic cleaning of a noisy landmark collection (DIR, Section 4).

For each label: SIFT features on downscaled images, ratio-test matching
between candidate pairs, RANSAC geometric verification (affine or
homography, with a minimum inlier count), region consistency (a pair's
matches must lie on the region most of each image's pairs agree on, so that
matches on shared backgrounds do not link different landmarks), a graph
whose edges are the pairs left, and the largest connected component kept (or
every component above a size). Each kept image gets the landmark's bounding box: the box of
the inlier keypoints of all its verified matches inside the kept component.
Those boxes train the region proposal network.

Pairs per label grow quadratically, so they are bounded: a label with more
than ``max_pairs`` pairs matches each image only with its ``neighbors`` most
similar images under a cheap global descriptor (the normalised mean of the
image's RootSIFT descriptors), which finds the near views of the same
landmark at a linear cost.

OpenCV does the local features and RANSAC; the graph, pair selection and box
logic are plain numpy. This package imports neither Keras nor TensorFlow, so
the worker processes that clean labels in parallel start quickly.

Modules: `features` (SIFT, matching), `verification` (RANSAC),
`graph` (pairs, region consistency, components, boxes), `label` (one
label end to end), `runner` (a whole manifest: journal, worker pool, the
``python -m training.clean`` job) and `report` (decisions, per-label
report).

Reference: Gordo, Almazán, Revaud, Larlus, "Deep Image Retrieval: Learning
global representations for image search", ECCV 2016, Section 4.
"""
