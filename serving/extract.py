"""Batch descriptor extraction against TensorFlow Serving (or the embedded server).

    python -m serving.extract --server localhost:8500 --model_name deep_retrieval \
        --images photos/ --output descriptors.parquet

Walks a folder recursively (or reads a CSV with an ``image`` column), sends
encoded images in batches with several requests in flight, and writes a
Parquet file with one row per image: ``image`` (path relative to the folder,
or the CSV value) and ``descriptor`` (float32 list). Only the public
``PredictionService.Predict`` protocol is used, so the real TF Serving works
unchanged.

* ``--server`` takes several comma-separated replicas; batches are spread
  over them and a batch whose replica fails is retried on another, with
  exponential backoff.
* A batch the server rejects is split to isolate the bad images; each goes to
  ``OUTPUT.errors.csv`` with its reason and the rest are extracted.
* Within each chunk, images are sent in the order of their size, so that
  same-size photos share a request (the signature runs each shape group as
  one batch); the output keeps the input order.
* File names that are not valid UTF-8 are written with ``\\xNN`` escapes for
  their undecodable bytes.
* ``--shard_size N`` writes OUTPUT as a folder of numbered Parquet shards of
  N rows each, in input order, for collections too large for one file.
* Results are committed in chunks under ``OUTPUT.parts/``; killed and rerun
  with the same arguments, the run resumes, with no image lost or repeated.
  The final Parquet file is written atomically, then the parts are removed.
* The model version is pinned when the run starts (``--model_version``, or
  the newest then) and recorded in the Parquet file's schema metadata
  (`deep_retrieval.descriptor_files.read_run_info`); a run or resume never mixes two versions.
"""

import concurrent.futures
import itertools
import os
import sys
import time

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.data.images import EXTENSIONS, file_problem
from deep_retrieval.descriptor_files import shard_name, write_descriptors
from deep_retrieval.files import atomic_csv, atomic_text, atomic_write, exclusive_lock
from serving import client

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_list("server", ["127.0.0.1:8500"], "host:port of one or more TF Serving replicas.")
    flags.DEFINE_string("model_name", "deep_retrieval", "ModelSpec.name.")
    flags.DEFINE_string("signature_name", "serving_default", "Signature taking encoded images.")
    flags.DEFINE_integer("model_version", None, "Model version to ask for (default: the newest when the run "
                         "starts; it is pinned for the run and recorded in the output).")
    flags.DEFINE_string("images", None, "Folder of images (walked recursively) or a CSV with an 'image' column.")
    flags.DEFINE_string("data_dir", None, "With a CSV: folder its image paths are relative to "
                        "(default: the CSV's folder).")
    flags.DEFINE_string("output", None, "Output Parquet file (with --shard_size: a folder of them).")
    flags.DEFINE_integer("shard_size", None, "Write OUTPUT as a folder of Parquet shards of this many rows, "
                         "descriptors-00000-of-00012.parquet, ... (what serving.index, Spark and autofaiss "
                         "read), instead of one file.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Images per request at most.")
    flags.DEFINE_integer("max_request_bytes", 16 << 20, "Encoded bytes per request at most (a single larger image "
                         "goes alone).")
    flags.DEFINE_integer("max_message_bytes", 256 << 20, "gRPC channel message limit (the default 4 MiB is too small "
                         "for image batches).")
    flags.DEFINE_integer("in_flight", 4, "Requests in flight at once.")
    flags.DEFINE_integer("chunk_size", 512, "Images per committed chunk (the unit of resumption).")
    flags.DEFINE_float("timeout", 120.0, "Seconds per request.")
    flags.DEFINE_integer("retries", 5, "Attempts per batch on unavailable replicas before giving up.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")


STOP = ("UNAVAILABLE", "NOT_FOUND", "UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED")
"""The run's own trouble, the same for every image: no replica answers even
after the retries, or the model (at the pinned version) is not served. The
run stops (a rerun resumes). Every other error is the request's own: its
batch is split until the failing images are alone, and each one costs one
row of the errors file, never the run."""

"""Key of the run's record (model name, version, signature; JSON) in the
output Parquet file's schema metadata."""


def printable_name(name):
    """A file name as printable UTF-8 text, one to one: bytes that are not
    UTF-8 (kept by Python as surrogate escapes) and control characters
    (``\\r``, ``\\n``, ...) are written as ``\\xNN``, and a backslash as
    ``\\\\``, so no two names map to one and no name splits a CSV row."""
    out = []
    for ch in name:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def list_images(source, data_dir=None):
    """``([(name, path)], [(name, reason)])``: the images of a folder walked
    recursively (sorted) or of a CSV, and the files a folder walk skipped.

    Raises ValueError when there is no image to extract.
    """
    import pandas as pd

    if os.path.isdir(source):
        out, skipped = [], []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                shown = printable_name(os.path.relpath(path, source))
                if name.lower().endswith(EXTENSIONS):
                    out.append((shown, path))
                else:
                    ending = os.path.splitext(name)[1].lower() or "no extension"
                    skipped.append((shown, f"{ending}: not an image type the model decodes ({', '.join(EXTENSIONS)})"))
        if not out:
            raise ValueError(f"{source}: no images ({', '.join(EXTENSIONS)}) in the folder or its subfolders"
                             + (f"; {len(skipped)} other files skipped" if skipped else ""))
        return out, skipped
    if not os.path.isfile(source):
        raise ValueError(f"{source}: no such folder or CSV file")
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)  # names verbatim: 007, 1e5, NA
    except pd.errors.EmptyDataError:
        raise ValueError(f"{source}: the CSV is empty; it needs an 'image' column") from None
    except Exception as e:
        raise ValueError(f"{source}: cannot read CSV: {e}") from e
    if "image" not in frame.columns:
        raise ValueError(f"{source}: the CSV needs an 'image' column")
    if frame.empty:
        raise ValueError(f"{source}: the CSV lists no images")
    base = data_dir or os.path.dirname(os.path.abspath(source))
    names = [str(v) for v in frame["image"].tolist()]
    return [(n, n if os.path.isabs(n) else os.path.join(base, n)) for n in names], []


def check_unique(items):
    """The names of ``items`` (``[(name, path)]``); a ValueError when one repeats."""
    names = [n for n, _ in items]
    duplicates = len(names) - len(set(names))
    if duplicates:
        raise ValueError(f"{duplicates} duplicate image names in the input; each image must appear once")
    return names


def report_skipped(skipped, stream=sys.stderr, shown=5):
    """Prints how many files a folder walk skipped, with the first few and why."""
    if skipped:
        print(f"skipped {len(skipped)} files that are not images:", file=stream)
        for name, reason in skipped[:shown]:
            print(f"  {name}: {reason}", file=stream)
        if len(skipped) > shown:
            print(f"  ... and {len(skipped) - shown} more", file=stream)


class Replicas:
    """Round-robin over PredictionService stubs, skipping failing replicas."""

    def __init__(self, addresses, max_message_bytes=client.MAX_MESSAGE_BYTES):
        self.addresses = list(addresses)
        self.stubs = [client.prediction_stub(a, max_message_bytes) for a in self.addresses]
        self._next = itertools.count()

    def pick(self, attempt):
        i = (next(self._next) + attempt) % len(self.stubs)
        return self.addresses[i], self.stubs[i]


class Extractor:
    """Sends batches, isolates bad images, retries on other replicas.

    ``version``: the model version every request asks for (``None``: the
    newest, until `pin` fixes it), so that one output never mixes the
    descriptors of two models."""

    def __init__(self, replicas, model_name, signature_name, timeout, retries, version=None):
        self.replicas = replicas
        self.model_name, self.signature_name = model_name, signature_name
        self.timeout, self.retries = timeout, retries
        self.version = version

    def pin(self, version=None):
        """Fixes the model version of every later request: ``version``, or
        else the one the replicas serve now, which must be the same on all
        that answer. Checks that it is served with the signature; returns
        it. Raises ValueError saying why not."""
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        version = version if version is not None else self.version
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        if version is not None:
            request.model_spec.version.value = int(version)

        def ask(attempt):  # every replica; again while none answers and all seem to be starting
            found, errors = {}, []
            for address, stub in zip(self.replicas.addresses, self.replicas.stubs):
                try:
                    found[address] = stub.GetModelMetadata(request, timeout=self.timeout)
                except grpc.RpcError as e:
                    errors.append((address, e))
            if not found and all(e.code().name in client.RETRYABLE for _, e in errors):
                raise errors[-1][1]
            return found, [f"{a}: {e.code().name}: {(e.details() or '')[:200]}" for a, e in errors]

        try:
            found, errors = client.with_retries(ask, self.retries)
        except grpc.RpcError as e:
            found, errors = {}, [f"{e.code().name}: {(e.details() or '')[:200]}"]
        for address, response in list(found.items()):
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
            if self.signature_name not in signatures.signature_def:
                raise ValueError(f"{address}: model {self.model_name!r} has no signature {self.signature_name!r} "
                                 f"(it has {', '.join(sorted(signatures.signature_def))})")
            found[address] = response.model_spec.version.value
        wanted = f"model {self.model_name!r}" + (f" version {version}" if version is not None else "")
        if not found:
            raise ValueError(f"no replica serves {wanted}: " + "; ".join(errors))
        if len(set(found.values())) > 1:
            raise ValueError(f"the replicas serve different versions of {self.model_name!r} "
                             f"({', '.join(f'{a}: {v}' for a, v in found.items())}); choose one with --model_version")
        self.version = next(iter(found.values()))
        return self.version

    def predict(self, blobs, boxes=None):
        """Descriptors ``[n, D]`` of encoded images; retries on other replicas.

        ``boxes`` (``[n, 4]`` pixels) goes with a signature that takes them
        (``crops``)."""
        request = client.predict_request(self.model_name, blobs, self.signature_name, boxes, self.version)

        def call(attempt):
            address, stub = self.replicas.pick(attempt)
            response = stub.Predict(request, timeout=self.timeout)
            answered = response.model_spec.version.value if response.model_spec.HasField("version") else None
            if self.version is not None and answered not in (None, self.version):
                raise ValueError(f"{address} answered with model version {answered}, not the pinned {self.version}")
            return client.descriptors(response)

        return client.with_retries(call, self.retries)

    def run(self, items):
        """``items``: ``[(name, bytes or Exception)]`` -> ``(rows, errors)``."""
        import grpc

        rows, errors, good = [], [], []  # isolates every item; see STOP
        for name, data in items:
            if isinstance(data, Exception):
                errors.append((name, f"cannot read file: {data}"))
            elif not data:
                errors.append((name, "empty file"))
            else:
                good.append((name, data))

        def reason(error):  # the request's own error names its image; any other stops the run
            if not isinstance(error, grpc.RpcError) or error.code().name in STOP:
                raise error
            return f"{error.code().name}: {error.details()}"

        described, failed = isolate(good, self.predict, reason)
        return rows + described, errors + failed


def isolate(items, call, reason):
    """``(rows, errors)`` for ``items`` (``[(name, data)]``): ``call`` on
    their data gives one result per item (``rows``: ``(name, result)``);
    a call that raises is split in halves until each failing item is alone,
    and ``reason(error)`` says what is wrong with it (``errors``:
    ``(name, reason)``), or raises when the error is not the items' own."""
    rows, errors, stack = [], [], [list(items)] if items else []
    while stack:
        batch = stack.pop()
        try:
            out = call([data for _, data in batch])
        except Exception as error:  # noqa: BLE001 - `reason` re-raises what is not the batch's own
            why = reason(error)
            if len(batch) == 1:
                errors.append((batch[0][0], why))
            else:
                half = len(batch) // 2
                stack.extend([batch[half:], batch[:half]])
            continue
        rows.extend((name, value) for (name, _), value in zip(batch, out))
    return rows, errors


def header_size(data):
    """``(height, width)`` from an encoded image's header, or ``(0, 0)``
    (unreadable, or an error in place of bytes): only an ordering key."""
    import io

    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        return (0, 0)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return (im.height, im.width)
    except Exception:  # noqa: BLE001 - the server names what is wrong with it
        return (0, 0)


def by_size(items):
    """``items`` ordered by image size (stable), so that same-size photos
    share a request and the server runs them as one batch; results are
    put back in input order when the output is written."""
    keys = [header_size(data) for _, data in items]
    return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]


def _batches(items, batch_size, max_bytes):
    batch, size = [], 0
    for item in items:
        n = len(item[1]) if isinstance(item[1], (bytes, bytearray)) else 0
        if batch and (len(batch) == batch_size or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


def read_file(path, max_bytes, limit="--max_message_bytes"):
    """The file's bytes, or the exception saying why not: only regular files
    are read (a FIFO would block, ``/dev/zero`` never ends), at most
    ``max_bytes`` (what one gRPC message can carry; ``limit`` names it)."""
    problem = file_problem(path, max_bytes, limit)
    if problem:
        return OSError(problem)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            return OSError(f"more than {limit} {max_bytes} bytes")
        return data
    except OSError as e:
        return e


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
        of that many rows (`deep_retrieval.descriptor_files.shard_name`).

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


def extract(items, output, extractor, batch_size=16, max_request_bytes=16 << 20, in_flight=4,
            chunk_size=512, progress=True, max_file_bytes=64 << 20, shard_size=None):
    """Extracts ``items`` (``[(name, path)]``) into ``output`` (a folder of
    shards of ``shard_size`` rows if given); resumable.

    The model version is pinned for the whole run and recorded with the
    output; a resumed run asks for the recorded one and stops, rather than
    mix two models, if it is not served."""
    from tqdm import tqdm

    names = check_unique(items)
    store = PartStore(output)
    try:
        info = store.run_info()
        if info is None:
            extractor.pin()
            store.record({"model_name": extractor.model_name, "model_version": extractor.version,
                          "signature_name": extractor.signature_name})
        else:
            if extractor.version is not None and extractor.version != info["model_version"]:
                raise ValueError(f"{store.folder} holds descriptors of model version {info['model_version']}; "
                                 f"--model_version {extractor.version} would mix two models in one output")
            try:
                extractor.pin(info["model_version"])
            except ValueError as e:
                raise ValueError(f"{e}. {store.folder} holds descriptors of model version {info['model_version']}: "
                                 f"resume while it is served, or remove {store.folder} to start over") from None
        done = store.done()
        todo = [(n, p) for n, p in items if n not in done]
        with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="extract",
                  disable=not progress) as bar, \
                concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            for start in range(0, len(todo), chunk_size):
                chunk = by_size([(n, read_file(p, max_file_bytes)) for n, p in todo[start:start + chunk_size]])
                futures = [pool.submit(extractor.run, b) for b in _batches(chunk, batch_size, max_request_bytes)]
                rows, errors, stopped = [], [], None
                for future in concurrent.futures.as_completed(futures):
                    try:
                        r, e = future.result()  # collected in this thread only
                    except Exception as error:  # noqa: BLE001 - re-raised once the rest is kept
                        stopped = stopped or error
                        continue
                    rows.extend(r)
                    errors.extend(e)
                    bar.update(len(r) + len(e))
                store.commit(rows, errors)  # what finished is kept even when the run stops
                if stopped is not None:
                    raise stopped
        return store.finish(names, shard_size)
    finally:
        store.close()


def main(argv):
    del argv
    if not FLAGS.images or not FLAGS.output:
        raise app.UsageError("--images and --output are required")
    extractor = None
    try:
        items, skipped = list_images(FLAGS.images, FLAGS.data_dir)
        report_skipped(skipped)
        replicas = Replicas(FLAGS.server, FLAGS.max_message_bytes)
        extractor = Extractor(replicas, FLAGS.model_name, FLAGS.signature_name, FLAGS.timeout, FLAGS.retries,
                              FLAGS.model_version)
        count, failed = extract(items, FLAGS.output, extractor, FLAGS.batch_size, FLAGS.max_request_bytes,
                                FLAGS.in_flight, FLAGS.chunk_size, FLAGS.progress, FLAGS.max_message_bytes,
                                FLAGS.shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # grpc errors that survived the retries
        import grpc

        if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.NOT_FOUND:
            version = extractor and extractor.version
            print(f"error: extraction stopped: model {FLAGS.model_name!r} version {version} is no "
                  f"longer served ({(e.details() or '')[:200]}); what was extracted is kept in {FLAGS.output}.parts: "
                  "resume while that version is served, or remove the folder to start over", file=sys.stderr)
            return 2
        print(f"error: extraction stopped ({type(e).__name__}: {e}); rerun the same command to resume",
              file=sys.stderr)
        return 2
    if not count:
        print(f"error: no descriptors: all {failed} images failed, see {FLAGS.output}.errors.csv", file=sys.stderr)
        return 1
    print(f"{count} descriptors written to {FLAGS.output}"
          + (f"; {failed} images failed, see {FLAGS.output}.errors.csv" if failed else ""))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
