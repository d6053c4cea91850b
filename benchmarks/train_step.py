"""Training-step speed, and peak memory per micro-batch size.

Times the optimizer step that ``fit`` runs (`ranking.RankingModel`'s
compiled train step: three streams, triplet loss, gradients, update; the
micro-batches of gradient accumulation one call each) on random images of
the preset's training size, so data loading is not included. Defaults: the
tiny and demo presets (the demo's frozen layers included), each as one
block (one aspect ratio) and triplet by triplet (mixed landscape and
portrait images, each at its own size), then ResNet-101 at 800 px (random
weights, batch 1; slow on a CPU).

``--memory`` instead runs one batch of ``--memory_batch`` ResNet-101
triplets at ``--memory_size`` px with ``--accumulate_steps`` 1, 2, 4, ...
(each in its own process) and prints each one's peak resident memory: what
one micro-batch costs, so the paper preset's 64 triplets can be split to fit
an accelerator.

    python benchmarks/train_step.py [--steps 5] [--skip_resnet]
    python benchmarks/train_step.py --memory [--memory_batch 4 --memory_size 800]
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from deep_retrieval.backbones.registry import freeze_backbone_before  # noqa: E402
from deep_retrieval.model.descriptor_model import build_descriptor_model  # noqa: E402
from deep_retrieval.presets import PRESETS  # noqa: E402
from deep_retrieval.ranking.siamese import STREAMS, RankingModel  # noqa: E402


def time_step(descriptor, image_size, batch, steps, warmup, train_from="", micro_batches=1, per_triplet=False):
    model = build_descriptor_model(descriptor)
    if train_from:
        freeze_backbone_before(model.backbone, train_from)
    micro = batch if per_triplet else micro_batches
    ranking = RankingModel(model, 0.1, batch // micro)
    ranking.compile(optimizer=keras.optimizers.Adam(1e-5, gradient_accumulation_steps=micro if micro > 1 else None),
                    jit_compile=False)
    height, width = int(round(image_size * 3 / 4)), int(image_size)  # a 4:3 landscape photo
    if per_triplet:
        # One triplet per call, landscape and portrait images mixed.
        shape = lambda i, k: (1, height, width, 3) if (i + k) % 2 else (1, width, height, 3)  # noqa: E731
        calls = [{name: tf.random.uniform(shape(i, k), 0, 255) for k, name in enumerate(STREAMS)}
                 for i in range(batch)]
    else:
        part = batch // micro
        calls = [{name: tf.random.uniform((part, height, width, 3), 0, 255) for name in STREAMS}] * micro
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        for inputs in calls:
            ranking.train_on_batch(inputs)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return batch / median, median


def peak_memory(batch, size, micro_batches):
    """Peak RSS (MB) of a process running two ResNet-101 steps."""
    import resource

    paper = PRESETS["paper"]()
    descriptor = dataclasses.replace(paper.descriptor, weights=None)
    time_step(descriptor, size, batch, 1, 1, micro_batches=micro_batches)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_table(args):
    import subprocess

    micro = 1
    while micro <= args.memory_batch:
        result = subprocess.run(
            [sys.executable, __file__, "--_child", str(micro), "--memory_batch", str(args.memory_batch),
             "--memory_size", str(args.memory_size)], capture_output=True, text=True)
        line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else f"failed: {result.stderr[-300:]}"
        print(f"resnet101 at {args.memory_size} px, {args.memory_batch} triplets in {micro} micro-batch(es) "
              f"of {args.memory_batch // micro}: peak RSS {line}", flush=True)
        micro *= 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_resnet", action="store_true")
    parser.add_argument("--resnet_batch", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="Peak memory per micro-batch size instead.")
    parser.add_argument("--memory_batch", type=int, default=4)
    parser.add_argument("--memory_size", type=int, default=800)
    parser.add_argument("--_child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(f"{peak_memory(args.memory_batch, args.memory_size, args._child):.0f} MB")
        return
    if args.memory:
        memory_table(args)
        return
    for name in ("tiny", "demo"):
        preset = PRESETS[name]()
        rate, sec = time_step(preset.descriptor, preset.image_size, preset.batch_size, args.steps,
                              args.warmup, preset.train_from)
        print(f"{name} preset ({preset.descriptor.backbone}, {preset.image_size} px, batch "
              f"{preset.batch_size}): {rate:.2f} triplets/s ({sec:.3f} s/step)", flush=True)
        rate, sec = time_step(preset.descriptor, preset.image_size, preset.batch_size, args.steps,
                              args.warmup, preset.train_from, per_triplet=True)
        print(f"{name} preset, mixed aspect ratios (triplet by triplet): {rate:.2f} triplets/s "
              f"({sec:.3f} s/step)", flush=True)
    if not args.skip_resnet:
        paper = PRESETS["paper"]()
        descriptor = dataclasses.replace(paper.descriptor, weights=None)
        rate, sec = time_step(descriptor, paper.image_size, args.resnet_batch, max(2, args.steps // 2), 1)
        print(f"resnet101 at {paper.image_size} px (batch {args.resnet_batch}): "
              f"{rate:.3f} triplets/s ({sec:.2f} s/step)")


if __name__ == "__main__":
    main()
