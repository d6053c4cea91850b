"""What a cleaning run decided: one row per input image, and a per-label
report."""


def decisions_frame(manifest, results):
    """One row per input row of a manifest: ``image, label, kept, reason,
    inliers, component, x0, y0, x1, y1``.

    Args:
        manifest: the `deep_retrieval.data.manifest.Manifest` read (its
            dropped rows come first, with the manifest's reason).
        results: ``{label: clean_label results}`` keyed by frame row.
    """
    import pandas as pd

    rows = [dict(image=p.image, label=None, kept=False, reason=p.reason, inliers=0, component=0)
            for p in manifest.problems]
    by_row = {r["key"]: r for label_results in results.values() for r in label_results}
    for i, row in enumerate(manifest.frame.itertuples(index=False)):
        r = by_row[i]
        box = r["box"] or [float("nan")] * 4
        rows.append(dict(image=row.image, label=row.label, kept=r["kept"], reason=r["reason"],
                         inliers=r["inliers"], component=r["component"],
                         x0=box[0], y0=box[1], x1=box[2], y1=box[3]))
    return pd.DataFrame(rows, columns=["image", "label", "kept", "reason", "inliers", "component",
                                       "x0", "y0", "x1", "y1"])


def report_frame(decisions):
    """Per label: ``images_in``, ``kept``, ``dropped``."""
    known = decisions[decisions["label"].notna()]
    report = known.groupby("label").agg(images_in=("image", "size"), kept=("kept", "sum")).reset_index()
    report["dropped"] = report["images_in"] - report["kept"]
    return report
