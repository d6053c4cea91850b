"""Batch extraction against TensorFlow Serving replicas (`serving.extract`
is its command): requests over several replicas with retries, the model
version pinned for a run, failing images isolated, results committed in
resumable chunks."""

import concurrent.futures
import itertools

from deep_retrieval.retrieval.batching import batches, by_size, isolate
from deep_retrieval.retrieval.image_lists import check_unique, read_file
from deep_retrieval.retrieval.part_store import PartStore
from serving import client

STOP = ("UNAVAILABLE", "NOT_FOUND", "UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED")
"""The run's own trouble, the same for every image: no replica answers even
after the retries, or the model (at the pinned version) is not served. The
run stops (a rerun resumes). Every other error is the request's own: its
batch is split until the failing images are alone, and each one costs one
row of the errors file, never the run."""

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
                futures = [pool.submit(extractor.run, b) for b in batches(chunk, batch_size, max_request_bytes)]
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
