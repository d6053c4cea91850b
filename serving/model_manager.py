"""Model versions under ``--model_base_path``: loading, polling for new ones,
and choosing the one a request names (TF Serving's "latest" policy)."""

import logging
import os
import re
import threading

import grpc

from serving.requests import InvalidRequest, bounded

log = logging.getLogger("serving.server")


class LoadedVersion:
    """One loaded SavedModel version: callables and signature protos."""

    def __init__(self, path, version):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.path, self.version = path, version
        self.module = tf.saved_model.load(path, tags=["serve"])
        self.functions = dict(self.module.signatures)
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        meta = next(m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags)
        self.signature_defs = {k: v for k, v in meta.signature_def.items() if k in self.functions}


def _versions(base_path):
    """Version numbers of the SavedModel folders under ``base_path``.

    Only canonical decimal names count (``7``, not ``007``, ``²`` or
    ``٣``), so each number names exactly one folder."""
    try:
        names = os.listdir(base_path)
    except OSError:
        return []
    return sorted(
        int(n) for n in names
        if re.fullmatch(r"0|[1-9][0-9]{0,17}", n) and os.path.exists(os.path.join(base_path, n, "saved_model.pb"))
    )


def _stamp(path):
    """What a version folder holds (names, sizes, times): a failed version is
    tried again once this changes, e.g. when a copy finishes."""
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            entries.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


class ModelManager:
    """Loads the newest version and swaps in newer ones found by polling."""

    def __init__(self, name, base_path, poll_seconds=1):
        self.name, self.base_path = name, base_path
        self._lock = threading.Lock()
        self.current = None
        self.failed = {}
        self.refresh()
        if self.current is None:
            raise ValueError(f"{base_path}: no loadable numeric version folder (e.g. {base_path}/1)")
        self._stop = threading.Event()
        if poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True)
            self._thread.start()

    def refresh(self):
        versions = _versions(self.base_path)
        newest = next(
            (v for v in reversed(versions)
             if v not in self.failed or self.failed[v][0] != _stamp(os.path.join(self.base_path, str(v)))),
            None,
        )
        if newest is None or (self.current and self.current.version >= newest):
            return
        path = os.path.join(self.base_path, str(newest))
        try:
            loaded = LoadedVersion(path, newest)
        except Exception as e:  # keep serving the old version; retried once the folder changes
            self.failed[newest] = (_stamp(path), str(e))
            log.error("cannot load %s: %s", path, e)
            return
        self.failed.pop(newest, None)
        with self._lock:
            self.current = loaded
        log.info("serving %s version %d from %s", self.name, newest, path)

    def _poll(self, seconds):
        while not self._stop.wait(seconds):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - polling must outlive any one bad folder
                log.exception("version poll of %s failed", self.base_path)

    def stop(self):
        self._stop.set()

    def get(self, spec):
        if spec.name != self.name:
            raise InvalidRequest(grpc.StatusCode.NOT_FOUND,
                                 f"Servable not found for request: Latest({bounded(spec.name)})")
        with self._lock:
            current = self.current
        if spec.HasField("version") and spec.version.value != current.version:
            raise InvalidRequest(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({bounded(spec.name)}, {spec.version.value})",
            )
        if spec.version_label:
            raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, "version labels are not configured")
        return current
