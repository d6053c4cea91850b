"""Training and evaluation data: manifests, the synthetic dataset, tf.data."""
