"""Descriptor-extraction speed: images/s, R-MAC head share, peak RSS.

Random-weight ResNet-101 (or --backbone) on an already decoded image of
--width x --height, one image per call, single scale and three scales
(1, 1/sqrt(2), sqrt(2)), with the backbone in float32 and in bfloat16
(`DescriptorConfig.dtype`, `--dtype`), as extraction runs it: batch norm
folded into the convolutions (`model.for_inference`; ``--no-fold`` times
the model as trained). With --reference PATH, the PyTorch
reference (`torch_rmac_reference.py`) runs in the same invocation, right
after, on the same image size, in float32 and in its fastest plain form
(``--channels-last --bf16``); the ratios of images/s are printed, and the
share of the bfloat16 GEMM ceiling for ResNet-101 (TF's 4096^3 bfloat16 GEMM,
measured in the same run unless ``--gemm_gflops`` gives it).

    python benchmarks/extract.py --reference ../shared/bench/torch_rmac_reference.py

Works on the TensorFlow and JAX backends (KERAS_BACKEND); --batch > 1 times
batches.
``--regions rpn`` times the model with the region proposal network (its
proposals, NMS and box pooling are then part of the head).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import keras
import numpy as np

from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model, for_inference

SINGLE = (1.0,)
MULTI = (1.0, 2**-0.5, 2**0.5)


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compile(fn):
    """A compiled callable for ``fn`` on the active backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=False, reduce_retracing=False)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def _stateless(model, layer):
    """A jittable pure function of the inputs with the layer's weights baked in."""
    if keras.backend.backend() != "jax":
        return lambda x: layer(x)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def fn(x):
        out, _ = layer.stateless_call(trainable, non_trainable, x)
        return out

    return fn


def _block(x):
    return keras.ops.convert_to_numpy(x)


def time_model(model, scales, images, warmup, batch):
    """Median seconds per call of the whole model, and of its R-MAC head."""
    model.multi_resolution.scales = scales
    full = _compile(_stateless(model, model))
    backbone = _compile(_stateless(model, model.backbone))
    head = _compile(_stateless(model, model.head))
    preprocess = _compile(_stateless(model, model.preprocess))
    from deep_retrieval.ops import functional

    rng = np.random.RandomState(0)
    totals, heads = [], []
    for i in range(warmup + images):
        x = keras.ops.convert_to_tensor(
            rng.uniform(0, 255, (batch,) + IMAGE_SHAPE).astype("float32")
        )
        _block(x[0, 0, 0])
        t0 = time.perf_counter()
        _block(full(x))
        total = time.perf_counter() - t0
        # The head on the feature maps of each scale, timed on its own.
        pre = preprocess(x)
        head_time = 0.0
        for s in scales:
            size = functional.scaled_size(IMAGE_SHAPE[0], IMAGE_SHAPE[1], s)
            xs = pre if s == 1 else functional.resize_bilinear(pre, *size)
            fmap = backbone(xs)
            _block(fmap)
            t0 = time.perf_counter()
            _block(head(fmap))
            head_time += time.perf_counter() - t0
        if i >= warmup:
            totals.append(total)
            heads.append(head_time)
        print(f"  scales={len(scales)} call {i}{' (warm-up)' if i < warmup else ''}: "
              f"{total:.3f}s, head {head_time * 1e3:.1f} ms", flush=True)
    total = statistics.median(totals)
    return {
        "images_per_s": batch / total,
        "seconds_per_call": total,
        "head_share": statistics.median(h / t for h, t in zip(heads, totals)),
        "head_ms": statistics.median(heads) * 1e3,
    }


def run_reference(path, args, fast):
    """The PyTorch reference, float32 (``fast`` False) or channels-last with
    bfloat16 autocast, PyTorch's fastest plain configuration."""
    out = f"/tmp/torch_rmac_reference_{'bf16' if fast else 'f32'}.json"
    cmd = [sys.executable, path, "--images", str(args.images), "--warmup", str(args.warmup),
           "--long-side", str(args.width), "--aspect", str(args.width / args.height), "--json", out]
    if fast:
        cmd += ["--channels-last", "--bf16"]
    if args.device:
        cmd += ["--device", args.device]
    print("reference:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


RESNET101_GFLOP = 244.0  # ResNet-101 trunk on a 1024x768 image (2 x 122 G multiply-adds)


def gemm_gflops(n=4096, repeats=5):
    """TF's bfloat16 ``n``-cube matrix product on this machine, best of ``repeats``, in GFLOP/s
    (AVX-512 BF16 and AMX machines differ by 2x: the ceiling is measured, not assumed)."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), tf.bfloat16)
    product = tf.function(tf.linalg.matmul)
    product(a, a).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--images", type=int, default=5, help="timed calls per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both",
                        help="the descriptor model's DescriptorConfig.dtype")
    parser.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True,
                        help="fold batch norm into the convolutions, as extraction does")
    parser.add_argument("--reference", default="", help="path of torch_rmac_reference.py (run in its float32 and "
                        "--channels-last --bf16 forms)")
    parser.add_argument("--device", default="", help="--device for the reference (cuda on a GPU)")
    parser.add_argument("--gemm_gflops", type=float, default=None,
                        help="the bfloat16 GEMM rate of this machine, for the ceiling (default: TF's 4096^3 "
                        "bfloat16 GEMM measured here, in this run)")
    parser.add_argument("--json", default="", help="write all figures here")
    parser.add_argument("--skip_multi", action="store_true")
    parser.add_argument("--regions", choices=["grid", "rpn"], default="grid")
    parser.add_argument("--proposals", type=int, default=256, help="RPN proposals (--regions rpn)")
    args = parser.parse_args()

    global IMAGE_SHAPE
    IMAGE_SHAPE = (args.height, args.width, 3)
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    info = {"backend": keras.backend.backend(), "backbone": args.backbone, "dtypes": dtypes,
            "regions": args.regions, "proposals": args.proposals if args.regions == "rpn" else None,
            "batch": args.batch, "fold_batch_norm": args.fold, "image": [args.height, args.width],
            "cpu_count": os.cpu_count()}
    print(json.dumps(info), flush=True)
    results = {"info": info}
    for dtype in dtypes:
        model = build_descriptor_model(
            DescriptorConfig(backbone=args.backbone, weights=None, levels=3, include_global=True,
                             regions=args.regions, proposals=args.proposals, dtype=dtype)
        )
        if args.fold:
            model = for_inference(model)
        results[dtype] = {"single_scale": time_model(model, SINGLE, args.images, args.warmup, args.batch)}
        if not args.skip_multi:
            results[dtype]["multi_scale"] = time_model(model, MULTI, args.images, args.warmup, args.batch)
    results["peak_rss_mb"] = _peak_rss_mb()
    references = {}
    if args.reference:
        references = {"torch float32": run_reference(args.reference, args, False),
                      "torch channels-last bf16": run_reference(args.reference, args, True)}
        results["reference"] = references
    ceiling = None
    if args.backbone == "resnet101":
        gflops = args.gemm_gflops or gemm_gflops()
        print(f"bfloat16 GEMM, 4096^3: {gflops:.0f} GFLOP/s", flush=True)
        ceiling = gflops / (RESNET101_GFLOP * args.width * args.height / (1024 * 768))
    for dtype in dtypes:
        for key in ("single_scale", "multi_scale"):
            if key not in results[dtype]:
                continue
            r = results[dtype][key]
            line = (f"{dtype} {key}: {r['images_per_s']:.3f} images/s ({r['seconds_per_call']:.3f} s/call), "
                    f"R-MAC head {r['head_share'] * 100:.2f}% ({r['head_ms']:.1f} ms)")
            for name, ref in references.items():
                if key in ref:
                    line += f"; {r['images_per_s'] / ref[key]['images_per_s']:.2f}x {name}"
            if ceiling and key == "single_scale":
                line += f"; {r['images_per_s'] / ceiling * 100:.0f}% of the bf16 GEMM ceiling ({ceiling:.2f}/s)"
            print(line)
    for name, ref in references.items():
        print(f"{name}: " + ", ".join(f"{k} {ref[k]['images_per_s']:.3f} images/s"
                                      for k in ("single_scale", "multi_scale") if k in ref))
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB (this process, all settings)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
