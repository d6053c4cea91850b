"""Training-step speed: triplets per second of the ranking training step.

Times the compiled step (three streams, triplet loss, gradients, optimizer
update) on random images of the preset's training size, so data loading is
not included. Defaults: the tiny and demo presets (the demo's frozen
layers included), then ResNet-101 at 800 px (random weights, batch 1; slow
on a CPU).

    python benchmarks/train_step.py [--steps 5] [--skip_resnet]
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from deep_retrieval import config as config_lib, losses  # noqa: E402
from deep_retrieval.data import pipeline  # noqa: E402
from deep_retrieval.model import build_descriptor_model  # noqa: E402
from deep_retrieval.trainer import freeze_backbone_before  # noqa: E402


def time_step(descriptor, image_size, batch, steps, warmup, train_from=""):
    model = build_descriptor_model(descriptor)
    if train_from:
        freeze_backbone_before(model.backbone, train_from)
    optimizer = keras.optimizers.Adam(1e-5)
    height, width = pipeline.training_size(image_size)

    @tf.function
    def step(q, p, n):
        with tf.GradientTape() as tape:
            d = model.single_scale(tf.concat([q, p, n], 0), training=True)
            loss = losses.triplet_ranking_loss(*tf.split(d, 3))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    images = [tf.random.uniform((batch, height, width, 3), 0, 255) for _ in range(3)]
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        float(step(*images))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return batch / median, median


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_resnet", action="store_true")
    parser.add_argument("--resnet_batch", type=int, default=1)
    args = parser.parse_args()
    for name in ("tiny", "demo"):
        preset = config_lib.PRESETS[name]()
        rate, sec = time_step(preset.descriptor, preset.image_size, preset.batch_size, args.steps,
                              args.warmup, preset.train_from)
        print(f"{name} preset ({preset.descriptor.backbone}, {preset.image_size} px, batch "
              f"{preset.batch_size}): {rate:.2f} triplets/s ({sec:.3f} s/step)", flush=True)
    if not args.skip_resnet:
        paper = config_lib.PRESETS["paper"]()
        descriptor = dataclasses.replace(paper.descriptor, weights=None)
        rate, sec = time_step(descriptor, paper.image_size, args.resnet_batch, max(2, args.steps // 2), 1)
        print(f"resnet101 at {paper.image_size} px (batch {args.resnet_batch}): "
              f"{rate:.3f} triplets/s ({sec:.2f} s/step)")


if __name__ == "__main__":
    main()
