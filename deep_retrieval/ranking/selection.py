"""Model selection of ranking training: every evaluation of the run scores
every validation split, one line each in ``metrics.jsonl``
(`Selection.records`), and ``model.keras`` is the model whose *worst*
relative gain over step 0 across the splits is the best so far.

Step 0 (``initial.keras``) is a candidate with gain 0: a later round
replaces it only when it beats it on every split. A model that gains on
views like its training views but loses on views of another renderer, or
on other photographs, is not kept. A resumed run reads the earlier
evaluations."""

import json
import os
import time

from deep_retrieval.retrieval import evaluation, extraction


def score_key(record):
    """The figure selection compares: Medium mAP, else the first protocol's mAP."""
    return "medium_map" if "medium_map" in record else next(k for k in record if k.endswith("_map"))


def worst_gain(records, baseline):
    """The smallest relative gain ``(m - m0) / m0`` of ``records`` (one step's,
    one per split) over ``baseline`` (step 0's, by split name), and the split
    it is on. A split step 0 scored 0 on counts gains in points."""
    worst = None
    for record in records:
        base = baseline[record["dataset"]]
        key = score_key(record)
        gain = (record[key] - base[key]) / (base[key] if base[key] > 0 else 1.0)
        if worst is None or gain < worst[0]:
            worst = (gain, record["dataset"])
    return worst


class Selection:
    """The run's evaluations and its choice of model.

    Args:
        output_dir: the run's folder (``metrics.jsonl``).
        datasets: the validation splits.
        save: writes the current model as model.keras.
        log: prints one message.

    Attributes:
        records: every evaluation of the run, as metrics.jsonl holds them.
        best: ``(worst relative gain, -step)`` of model.keras.
    """

    def __init__(self, output_dir, datasets, save, log):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.datasets, self.save, self.log = datasets, save, log
        self.records = None
        self.best = None

    def evaluate(self, step, describer):
        """Scores every split with ``describer(name)``, appends one
        metrics.jsonl line for each, keeps model.keras (`select`) and
        returns the step's records."""
        records = []
        for dataset in self.datasets:
            start = time.time()
            results = extraction.evaluate_model(describer(dataset.name), dataset)
            record = {"step": int(step), "dataset": dataset.name, "time": round(time.time() - start, 2)}
            for protocol, values in results.items():
                for key, value in values.items():
                    record[f"{protocol}_{key.replace('@', '')}"] = round(float(value), 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.log(f"{dataset.name} at step {step}:\n{evaluation.format_table(results)}")
            records.append(record)
        self.select(records)
        self.earlier(step).extend(records)
        return records

    def earlier(self, step):
        """`records`, read from metrics.jsonl on first use: the evaluations
        before ``step`` (those of the run a resumed run continues)."""
        if self.records is None:
            self.records = []
            if os.path.exists(self.path):
                with open(self.path) as f:
                    self.records = [row for row in map(json.loads, f) if row["step"] < step]
        return self.records

    def baseline(self, records):
        """Step 0's record of each split: among ``records`` (step 0's own)
        or the earlier ones."""
        rows = [r for r in self.earlier(records[0]["step"]) if r["step"] == 0] + list(records)
        return {r["dataset"]: r for r in rows if r["step"] == 0}

    def select(self, records):
        """Writes model.keras when ``records`` (one step's, every split) has a
        worst relative gain over step 0 above every earlier step's; step 0
        itself scores 0 and is written first. Ties keep the earlier."""
        step = records[0]["step"]
        baseline = self.baseline(records)
        if set(baseline) != {r["dataset"] for r in records}:
            raise ValueError(f"no step-0 evaluation of {sorted({r['dataset'] for r in records} - set(baseline))} "
                             f"in {self.path}: selection compares every step with step 0")
        if self.best is None:
            self.best = (float("-inf"), 0)
            by_step = {}
            for row in self.earlier(step):  # earlier evaluations, when resuming
                by_step.setdefault(row["step"], []).append(row)
            for earlier, rows in sorted(by_step.items()):
                self.best = max(self.best, (worst_gain(rows, baseline)[0], -earlier))
        gain, split = worst_gain(records, baseline)
        if (gain, -step) > self.best:
            self.best = (gain, -step)
            self.save()
            if step:
                self.log(f"model.keras: the model at step {step}, better than step 0 on every split "
                         f"(least on {split}: {100 * gain:+.1f} %)")
            else:
                self.log("model.keras: the step-0 model, until a round beats it on every split")
        elif step:
            self.log(f"step {step} is not kept: {split} {100 * gain:+.1f} % against step 0 "
                     f"(model.keras stays the model at step {-self.best[1]})")
