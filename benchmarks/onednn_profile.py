"""Where one ResNet-101 bfloat16 call spends its time, per oneDNN primitive,
in this project (TensorFlow) and in the PyTorch reference
(``--channels-last --bf16``), side by side in one run.

Each side runs in its own process with ``ONEDNN_VERBOSE=1``; the primitive
executions of its calls are summed by kind (convolution, reorder, ...) and
divided by the number of forward passes (ResNet-101 runs 104 convolutions
per pass). Wall time minus the oneDNN time is what runs outside oneDNN
(batch norm, ReLU, additions, casts, padding: Eigen kernels in TF, ATen ones
in PyTorch).

    python benchmarks/onednn_profile.py --reference ../shared/bench/torch_rmac_reference.py
"""

import argparse
import collections
import os
import subprocess
import sys
import time

CONVOLUTIONS_PER_PASS = 104  # ResNet-101: stem, 33 blocks x 3, 4 projections


def tf_child(width, height, calls):
    import numpy as np
    import tensorflow as tf

    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model

    model = build_descriptor_model(DescriptorConfig(backbone="resnet101", weights=None, levels=3,
                                                    include_global=True, scales=(1.0,), dtype="bfloat16"))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, height, width, 3)).astype("float32"))
    fn = tf.function(lambda images: model(images))
    fn(x).numpy()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x).numpy()
    print(f"WALL {(time.perf_counter() - start) / calls:.4f} {calls + 1}", flush=True)


def summarize(stdout):
    """``(wall s per timed call, {kind: ms per pass}, {implementation: ms per pass})``."""
    kinds, impls, wall, convolutions = collections.Counter(), collections.Counter(), None, 0
    for line in stdout.splitlines():
        if line.startswith("WALL "):
            wall = float(line.split()[1])
        parts = line.split(",")
        if len(parts) < 6 or parts[:4] != ["onednn_verbose", "v1", "primitive", "exec"]:
            continue
        kind, impl, ms = parts[5], parts[6], float(parts[-1])
        kinds[kind] += ms
        impls[f"{kind} {impl}"] += ms
        convolutions += kind == "convolution"
    passes = max(convolutions / CONVOLUTIONS_PER_PASS, 1)
    return wall, passes, {k: v / passes for k, v in kinds.items()}, {k: v / passes for k, v in impls.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="", help="path of torch_rmac_reference.py (skipped without it)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        tf_child(args.width, args.height, args.calls)
        return
    env = dict(os.environ, ONEDNN_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="2")
    runs = {}
    tf_out = subprocess.run([sys.executable, __file__, "--_child", "--width", str(args.width), "--height",
                             str(args.height), "--calls", str(args.calls)], env=env, capture_output=True,
                            text=True, check=True).stdout
    runs["this project (TF, bf16)"] = summarize(tf_out)
    if args.reference:
        out = subprocess.run([sys.executable, args.reference, "--channels-last", "--bf16", "--skip-ms",
                              "--images", str(args.calls), "--warmup", "1", "--long-side",
                              str(max(args.width, args.height)), "--aspect", str(args.width / args.height)],
                             env=env, capture_output=True, text=True, check=True).stdout
        runs["PyTorch channels-last bf16"] = summarize(out)
    print(f"ResNet-101 R-MAC, {args.width}x{args.height}, one image per call; ms per forward pass")
    for name, (wall, passes, kinds, impls) in runs.items():
        dnn = sum(kinds.values())
        print(f"\n{name}: {passes:.1f} passes profiled, oneDNN primitives {dnn:.0f} ms per pass"
              + (f", wall {1000 * wall:.0f} ms per call (outside oneDNN: {1000 * wall - dnn:.0f})" if wall else ""))
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:22s} {ms:8.1f}")
        print("  by implementation:")
        for impl, ms in sorted(impls.items(), key=lambda kv: -kv[1])[:6]:
            print(f"    {impl:44s} {ms:8.1f}")


if __name__ == "__main__":
    main()
