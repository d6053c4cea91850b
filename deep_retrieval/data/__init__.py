"""Training manifests, the synthetic dataset, ground truth, the image codec
(`images`) and tf.data pipelines."""
