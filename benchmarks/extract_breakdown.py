"""Where a ResNet-101 extraction call spends its time beyond the
convolutions: the whole model against its backbone alone, and the effect of
TensorFlow's inter-op threads and of XLA, each in its own process (thread
settings only take effect before TensorFlow starts).

    python benchmarks/extract_breakdown.py [--dtype bfloat16] [--width 1024 --height 768]
"""

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def child(mode, dtype, width, height, calls):
    import tensorflow as tf

    if mode == "inter_op_1":
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import numpy as np

    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model

    model = build_descriptor_model(DescriptorConfig(backbone="resnet101", weights=None, levels=3,
                                                    include_global=True, scales=(1.0,), dtype=dtype))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, height, width, 3)).astype("float32"))
    def whole(images):
        return model(images)

    def backbone(images):
        return model.backbone(model.preprocess(images))

    for name, fn in (("model", whole), ("backbone", backbone)):
        compiled = tf.function(fn, jit_compile=mode == "xla")
        compiled(x).numpy()
        compiled(x).numpy()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            compiled(x).numpy()
            times.append(time.perf_counter() - start)
        print(f"{mode:12s} {name:9s} {min(times):.3f} s per image", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child, args.dtype, args.width, args.height, args.calls)
        return
    print(f"ResNet-101, {args.width}x{args.height}, {args.dtype}, single scale, best of {args.calls} calls")
    for mode in ("default", "inter_op_1", "xla"):
        subprocess.run([sys.executable, __file__, "--_child", mode, "--dtype", args.dtype, "--width", str(args.width),
                        "--height", str(args.height), "--calls", str(args.calls)], check=True)


if __name__ == "__main__":
    main()
