"""Training manifests: a CSV of ``image,label[,x0,y0,x1,y1]`` read with pandas.

`read_manifest` validates every row and keeps the good ones; every dropped
row is reported with its row number (1-based, as in a spreadsheet, header
excluded) and the reason, never silently.
"""

import dataclasses
import os

import numpy as np
import pandas as pd
from PIL import Image

from deep_retrieval.data.images import FORMATS, check_image, file_problem

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclasses.dataclass
class Problem:
    row: int
    image: str
    reason: str

    def __str__(self):
        return f"row {self.row} ({self.image}): {self.reason}"


@dataclasses.dataclass
class Manifest:
    """The valid rows (``frame``: columns image, path, label, x0..y1, width,
    height), the rows dropped (``problems``) and the rows kept without their
    invalid box (``box_problems``)."""

    frame: pd.DataFrame
    problems: list
    box_problems: list = dataclasses.field(default_factory=list)

    @property
    def has_boxes(self):
        return self.frame[list(BOX_COLUMNS)].notna().all(axis=1).to_numpy()

    def summary(self):
        text = (
            f"{len(self.frame)} images kept ({int(self.has_boxes.sum())} with a box), "
            f"{len(self.problems)} rows skipped"
        )
        if self.box_problems:
            text += f", {len(self.box_problems)} invalid boxes ignored"
        return text




def _image_size(path):
    """(width, height) of an image training can decode, or raises with a reason.

    The whole file is decoded (at reduced JPEG scale, for speed), so a
    truncated file is caught here rather than in the middle of training; a
    header over the pixel limit is refused before decoding.
    """
    with Image.open(path) as im:
        if im.format not in FORMATS:
            raise ValueError(f"format {im.format} is not one of {', '.join(FORMATS)}")
        width, height = im.size
        check_image(im)
        im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        im.load()
    return width, height


def read_manifest(csv_path, data_dir, allow_outside=False, check_images=True):
    """Reads and validates a training manifest.

    Args:
        csv_path: the CSV file.
        data_dir: the folder image paths are relative to.
        allow_outside: accept paths that resolve outside ``data_dir``.
        check_images: open every image (size, readability).

    Returns:
        A `Manifest`. Rows are dropped for: a missing image column value, a
        path escaping ``data_dir``, a missing or unreadable file, and finally
        a label left with a single image. A partial or invalid box
        (non-numeric, empty, or outside the image) is dropped from its row,
        which is kept without a box and reported in ``box_problems``.
    """
    try:
        # Image names verbatim (``NA``, ``007``, ``1e5`` are names); an empty
        # cell is missing in every other column.
        df = pd.read_csv(csv_path, dtype={"image": str}, keep_default_na=False,
                         na_values={c: [""] for c in ("label", *BOX_COLUMNS)})
    except Exception as e:  # pandas raises many types
        raise ValueError(f"{csv_path}: cannot read the manifest CSV: {e}") from e
    missing = {"image", "label"} - set(df.columns)
    if missing:
        raise ValueError(
            f"{csv_path}: the manifest needs columns 'image' and 'label'; missing {sorted(missing)}."
        )
    for col in BOX_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    root = os.path.realpath(data_dir)
    problems, box_problems, keep = [], [], []
    for i, row in enumerate(df.itertuples(index=False), start=1):
        image = row.image
        if not isinstance(image, str) or not image.strip():
            problems.append(Problem(i, str(image), "empty image path"))
            continue
        path = os.path.realpath(os.path.join(root, image))
        if not allow_outside and os.path.commonpath([root, path]) != root:
            problems.append(Problem(i, image, f"path escapes the data directory {root}"))
            continue
        if not os.path.lexists(path):
            problems.append(Problem(i, image, "file not found"))
            continue
        unusable = file_problem(path)
        if unusable:
            problems.append(Problem(i, image, f"unreadable image ({unusable})"))
            continue
        width = height = np.nan
        if check_images:
            try:
                width, height = _image_size(path)
            except Exception as e:
                problems.append(Problem(i, image, f"unreadable image ({type(e).__name__}: {e})"))
                continue
        box = [getattr(row, c) for c in BOX_COLUMNS]
        present = [not pd.isna(v) for v in box]
        if any(present):
            reason = _box_problem(box, present, width, height)
            if reason:
                box_problems.append(Problem(i, image, f"box ignored: {reason}"))
                box = [np.nan] * 4
        keep.append((image, path, row.label, *box, width, height))
    frame = pd.DataFrame(keep, columns=["image", "path", "label", *BOX_COLUMNS, "width", "height"])
    counts = frame["label"].value_counts()
    lonely = frame["label"].map(counts) < 2
    for image in frame.loc[lonely, "image"]:
        row = int(df.index[df["image"] == image][0]) + 1
        problems.append(Problem(row, image, "its label has no other image (no positive pair)"))
    frame = frame.loc[~lonely].reset_index(drop=True)
    problems.sort(key=lambda p: p.row)
    return Manifest(frame, problems, box_problems)


def _box_problem(box, present, width, height):
    if not all(present):
        return "partial box: give all of x0,y0,x1,y1 or none"
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return f"non-numeric box {box}"
    if not (x1 > x0 and y1 > y0):
        return f"empty box ({x0:g},{y0:g},{x1:g},{y1:g})"
    if not np.isnan(width) and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
        return f"box ({x0:g},{y0:g},{x1:g},{y1:g}) outside the {width}x{height} image"
    return None
