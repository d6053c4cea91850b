"""The resumable results of a batch extraction: chunks committed under
``OUTPUT.parts/`` as atomic files, merged into the output in input order."""

import os
import time

from deep_retrieval.io.atomic import atomic_csv, atomic_text, atomic_write, exclusive_lock
from deep_retrieval.retrieval.descriptor_files import shard_name, write_descriptors


class PartStore:
    """Committed chunks of results under ``OUTPUT.parts/`` (atomic files)."""

    def __init__(self, output):
        self.output = output
        self.folder = output + ".parts"
        os.makedirs(self.folder, exist_ok=True)
        # One run per output: a second one would duplicate rows.
        self._lock = exclusive_lock(os.path.join(self.folder, "lock"),
                                    f"{output}: another extraction is writing it (lock held on "
                                    f"{self.folder}/lock); wait for it or choose another --output")
        self._lock.__enter__()

    def close(self):
        """Releases the output's lock."""
        self._lock.__exit__(None, None, None)

    def run_info(self):
        """What the parts were extracted with (model name, version,
        signature), or None for a new output."""
        import json

        try:
            with open(os.path.join(self.folder, "run.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ValueError(f"{self.folder}/run.json: unreadable ({e}); remove {self.folder} to start over") from e

    def record(self, info):
        """Writes the run's record (see `run_info`)."""
        import json

        atomic_text(os.path.join(self.folder, "run.json"), json.dumps(info))

    def done(self):
        import pandas as pd

        names = set()
        for f in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, f)
            if f.endswith(".parquet"):
                names.update(pd.read_parquet(path, columns=["image"])["image"])
            elif f.endswith(".errors.csv"):
                names.update(pd.read_csv(path, dtype=str, keep_default_na=False)["image"])
        return names

    def commit(self, rows, errors):
        import numpy as np
        import pandas as pd

        stamp = f"{time.time_ns()}-{os.getpid()}"
        if rows:
            frame = pd.DataFrame({"image": [r[0] for r in rows],
                                  "descriptor": [np.asarray(r[1], np.float32) for r in rows]})
            atomic_write(os.path.join(self.folder, f"part-{stamp}.parquet"), frame.to_parquet)
        if errors:
            frame = pd.DataFrame(errors, columns=["image", "reason"])
            atomic_csv(os.path.join(self.folder, f"part-{stamp}.errors.csv"), frame)

    def finish(self, order, shard_size=None):
        """Merges the parts into OUTPUT (and OUTPUT.errors.csv), in input
        order: one Parquet file, or with ``shard_size`` a folder of shards
        of that many rows (`deep_retrieval.retrieval.descriptor_files.shard_name`).

        The parts are read twice, names first, so that each shard is put
        together from the parts that hold its rows and memory stays at one
        shard."""
        import shutil

        import numpy as np
        import pandas as pd

        parts = sorted(os.listdir(self.folder))
        row_parts = [os.path.join(self.folder, f) for f in parts if f.endswith(".parquet")]
        rank = {name: i for i, name in enumerate(order)}
        ranks = [pd.read_parquet(p, columns=["image"])["image"].map(rank).to_numpy(np.int64) for p in row_parts]
        ordered = np.sort(np.concatenate(ranks)) if ranks else np.zeros(0, np.int64)
        info = self.run_info()

        def shard(lo, hi):  # the rows whose rank is in [lo, hi], in rank order
            frames = []
            for path, r in zip(row_parts, ranks):
                inside = (r >= lo) & (r <= hi)
                if inside.any():
                    frames.append(pd.read_parquet(path)[inside].assign(_rank=r[inside]))
            if not frames:
                return pd.DataFrame({"image": pd.Series([], dtype=str), "descriptor": []})
            frame = pd.concat(frames, ignore_index=True).sort_values("_rank", kind="stable")
            return frame.drop(columns="_rank").reset_index(drop=True)

        if shard_size is None:
            atomic_write(self.output, lambda p: write_descriptors(shard(0, len(order)), p, info))
        else:
            count = max(1, -(-len(ordered) // shard_size))

            def write(folder):
                os.makedirs(folder)
                for i in range(count):
                    chunk = ordered[i * shard_size:(i + 1) * shard_size]
                    lo, hi = (chunk[0], chunk[-1]) if len(chunk) else (0, -1)
                    write_descriptors(shard(lo, hi), os.path.join(folder, shard_name(i, count)), info)

            atomic_write(self.output, write)
        error_path = self.output + ".errors.csv"
        errors = [pd.read_csv(os.path.join(self.folder, f), dtype=str, keep_default_na=False)
                  for f in parts if f.endswith(".errors.csv")]
        if errors:
            merged = pd.concat(errors, ignore_index=True)
            atomic_csv(error_path, merged)
        elif os.path.exists(error_path):
            os.remove(error_path)
        shutil.rmtree(self.folder)
        return len(ordered), (len(merged) if errors else 0)
