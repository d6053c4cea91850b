"""A whole manifest cleaned: labels in parallel worker processes, each
finished label journalled so that a killed run resumes, and the job behind
``python -m training.clean``."""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os

from tqdm import tqdm

from deep_retrieval.cleaning.label import clean_label
from deep_retrieval.cleaning.report import decisions_frame, report_frame
from deep_retrieval.io.atomic import atomic_csv


def journal_path(output, config, manifest_path):
    """Where finished labels are recorded while a run is in progress. The
    name holds a hash of the settings (``workers`` aside) and of the
    manifest's bytes, so a rerun of the same job resumes and any other job
    starts afresh."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode())
    with open(manifest_path, "rb") as f:
        digest.update(f.read())
    return f"{output}.journal-{digest.hexdigest()[:12]}.jsonl"


def _read_journal(path):
    done = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash: that label runs again
            done[entry["label"]] = entry["results"]
    return done


def _clean_one(args):
    label, images, config = args
    return label, clean_label(images, config)


def clean_manifest(groups, config, journal, progress=True):
    """Cleans every label, in parallel, resuming from ``journal``.

    Args:
        groups: ``{label: [(key, path), ...]}`` (labels as strings).
        config: `CleanConfig`.
        journal: JSON-lines file; each finished label is appended (and
            flushed to disk) as soon as it is done, and labels already in it
            are not run again.
        progress: show a progress bar.

    Returns:
        ``{label: results of clean_label}``.
    """
    done = _read_journal(journal)
    todo = sorted((k for k in groups if k not in done), key=lambda k: -len(groups[k]))
    workers = config.workers or os.cpu_count() or 1
    bar = tqdm(total=sum(len(v) for v in groups.values()), initial=sum(len(groups[k]) for k in done if k in groups),
               desc="cleaning", unit="img", disable=not progress)
    with open(journal, "a") as log:
        def record(label, results):
            log.write(json.dumps({"label": label, "results": results}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            done[label] = results
            bar.update(len(results))

        # Workers import this module and the configuration only (no Keras or
        # TensorFlow), so starting them is cheap.
        jobs = [(label, groups[label], config) for label in todo]
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                record(*_clean_one(job))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                for label, results in pool.map(_clean_one, jobs, chunksize=1):
                    record(label, results)
    bar.close()
    return {k: done[k] for k in groups}


def run(manifest_path, data_dir, output, config, allow_outside=False, progress=True):
    """Cleans ``manifest_path`` into ``output``; returns a printable summary."""
    from deep_retrieval.data import manifest as manifest_lib

    data_dir = data_dir or os.path.dirname(os.path.abspath(manifest_path))
    manifest = manifest_lib.read_manifest(manifest_path, data_dir, allow_outside, check_images=False)
    frame = manifest.frame
    groups = {}
    for i, row in enumerate(frame.itertuples(index=False)):
        groups.setdefault(str(row.label), []).append((i, row.path))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    journal = journal_path(output, config, manifest_path)
    results = clean_manifest(groups, config, journal, progress)

    decisions = decisions_frame(manifest, results)
    kept = decisions[decisions["kept"]]
    report = report_frame(decisions)
    atomic_csv(output, kept[["image", "label", "x0", "y0", "x1", "y1"]])
    atomic_csv(f"{output}.decisions.csv", decisions)
    atomic_csv(f"{output}.report.csv", report)
    os.remove(journal)
    reasons = decisions.loc[~decisions["kept"], "reason"].str.replace(r"\(.*", "", regex=True)
    reasons = reasons.str.replace(r"group of \d+ images, not the kept group of \d+", "group, not the kept one",
                                  regex=True)
    lines = [f"{len(decisions)} images in, {len(kept)} kept with a box, "
             f"{len(decisions) - len(kept)} dropped, over {len(report)} labels "
             f"({int((report['kept'] >= 2).sum())} keep at least 2 images)"]
    for reason, count in reasons.value_counts().items():
        lines.append(f"  dropped: {count:5d}  {reason.strip()}")
    lines.append(f"wrote {output}, {output}.decisions.csv, {output}.report.csv")
    return "\n".join(lines)
