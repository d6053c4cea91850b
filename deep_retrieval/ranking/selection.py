"""Model selection of ranking training: every evaluation of the run is a
line of ``metrics.jsonl`` (`Selection.records`), and ``model.keras`` is
the model that scored best on the validation split so far (early
stopping; a resumed run reads the earlier evaluations)."""

import json
import os
import time

from deep_retrieval.retrieval import evaluation, extraction


class Selection:
    """The run's evaluations and its choice of model.

    Args:
        output_dir: the run's folder (``metrics.jsonl``).
        datasets: the benchmarks, the validation split first.
        save: writes the current model as model.keras.
        log: prints one message.
    """

    def __init__(self, output_dir, datasets, save, log):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.datasets, self.save, self.log = datasets, save, log
        self.records = None  # every evaluation of the run, as metrics.jsonl holds them
        self.best = None  # (validation score, -step) of model.keras

    def evaluate(self, step, describer, validation_only=False):
        """Scores the benchmarks (the validation split, the first, alone
        with ``validation_only``) with ``describer(name)``, appends one
        metrics.jsonl line for each and returns the validation's record.
        The model that scores best on the validation so far is model.keras
        (`select`)."""
        records = []
        for dataset in self.datasets[:1] if validation_only else self.datasets:
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
        self.select(records[0])
        self.earlier(step).extend(records)
        return records[0]

    def earlier(self, step):
        """`records`, read from metrics.jsonl on first use: the evaluations
        before ``step`` (those of the run a resumed run continues)."""
        if self.records is None:
            self.records = []
            if os.path.exists(self.path):
                with open(self.path) as f:
                    self.records = [row for row in map(json.loads, f) if row["step"] < step]
        return self.records

    def select(self, record):
        """Early stopping on the validation split: writes model.keras when
        ``record`` (the validation's) beats every earlier evaluation of the
        run in `records` (Medium mAP, else the first protocol's; ties keep
        the earlier)."""
        key = "medium_map" if "medium_map" in record else next(k for k in record if k.endswith("_map"))
        if self.best is None:
            self.best = (-1.0, -1)
            for row in self.earlier(record["step"]):  # earlier evaluations, when resuming
                if row.get("dataset") == record["dataset"] and row["step"] < record["step"]:
                    self.best = max(self.best, (row[key], -row["step"]))
        if (record[key], -record["step"]) > self.best:
            self.best = (record[key], -record["step"])
            self.save()
            self.log(f"model.keras: the model at step {record['step']} ({record['dataset']} {key} "
                     f"{record[key]:.2f})")
