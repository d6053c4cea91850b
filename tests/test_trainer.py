import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from deep_retrieval import config as config_lib
from deep_retrieval.config import DescriptorConfig, SyntheticConfig
from deep_retrieval.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_DATA = SyntheticConfig(
    train_landmarks=4, images_per_landmark=3, test_landmarks=2,
    test_images_per_landmark=3, distractors=2, image_width=96, image_height=72, seed=3,
)


def small_config(output_dir, **overrides):
    cfg = config_lib.PRESETS["demo"]()
    settings = dict(image_size=64, batch_size=2, steps=2, mine_every=2, checkpoint_every=2,
                    whitening_images=6)
    cfg = dataclasses.replace(cfg, output_dir=str(output_dir), **{**settings, **overrides})
    cfg.synthetic = SMALL_DATA
    cfg.descriptor = DescriptorConfig(backbone="tiny", weights=None, whitening_dim=16, scales=(1.0,))
    return cfg


def _state(trainer):
    return (
        int(trainer.optimizer.iterations),
        [np.array(v) for v in trainer.optimizer.variables],
        [np.array(w) for w in trainer.model.get_weights()],
    )


def test_resume_continues_step_and_optimizer_state(tmp_path):
    first = Trainer(small_config(tmp_path / "run"), progress=False)
    path = first.run()
    assert os.path.exists(path) and int(first.step.numpy()) == 2
    iterations, opt_vars, weights = _state(first)
    assert iterations == 2

    with pytest.raises(ValueError, match="--resume"):
        Trainer(small_config(tmp_path / "run", steps=4), progress=False).run()

    second = Trainer(small_config(tmp_path / "run", steps=4, resume=True), progress=False)
    assert second.restore_or_start()
    assert int(second.step.numpy()) == 2
    it2, opt2, w2 = _state(second)
    assert it2 == iterations
    for a, b in zip(opt2, opt_vars):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(w2, weights):
        np.testing.assert_array_equal(a, b)
    second.run()
    assert int(second.step.numpy()) == 4 and int(second.optimizer.iterations) == 4
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [0, 2, 4]
    record = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert {"easy_map", "medium_map", "hard_map"} <= set(record)


_WORKER = """
import json, os, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.test_trainer import small_config
from deep_retrieval.trainer import Trainer, make_strategy
index = int(sys.argv[1])
strategy = make_strategy("multi_worker")
cfg = small_config(sys.argv[2] + f"/w{{index}}", steps=3, strategy="multi_worker")
trainer = Trainer(cfg, strategy=strategy, progress=False)
trainer.run()
np.savez(sys.argv[2] + f"/weights{{index}}.npz", *[np.array(w) for w in trainer.model.get_weights()])
print("done", index, int(trainer.step.numpy()))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_end_with_the_same_weights(tmp_path):
    # Generate the dataset once so the workers do not race for it.
    from deep_retrieval.data import synthetic

    synthetic.ensure_dataset(SMALL_DATA, progress=False)
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "PYTHONPATH": ROOT}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER.format(root=ROOT), str(index), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    a = np.load(tmp_path / "weights0.npz")
    b = np.load(tmp_path / "weights1.npz")
    assert len(a.files) == len(b.files) > 0
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
    assert os.path.exists(tmp_path / "w0" / "model.keras")
    assert not os.path.exists(tmp_path / "w1" / "model.keras")
    assert "done 0 3" in outputs[0] and "done 1 3" in outputs[1]
