import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks._served import free_port
from deep_retrieval.config import DescriptorConfig, SyntheticConfig
from deep_retrieval.presets import PRESETS
from deep_retrieval.ranking import rpn_targets
from deep_retrieval.ranking.siamese import STREAMS
from deep_retrieval.ranking.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL_DATA = SyntheticConfig(
    source="facades", train_landmarks=4, images_per_landmark=3, test_landmarks=2,
    test_images_per_landmark=3, distractors=2, image_width=96, image_height=72, seed=3,
)


def small_config(output_dir, **overrides):
    cfg = PRESETS["tiny"]()
    settings = dict(image_size=64, batch_size=2, steps=2, mine_every=2, checkpoint_every=2,
                    whitening_images=6)
    cfg = dataclasses.replace(cfg, output_dir=str(output_dir), **{**settings, **overrides})
    cfg.synthetic = SMALL_DATA
    cfg.descriptor = DescriptorConfig(backbone="tiny", weights=None, whitening_dim=16, scales=(1.0,))
    return cfg


def _state(trainer):
    return (
        int(trainer.ranking.optimizer.iterations),
        [np.array(v) for v in trainer.ranking.optimizer.variables],
        [np.array(w) for w in trainer.model.get_weights()],
    )


def test_resume_continues_step_and_optimizer_state(tmp_path):
    first = Trainer(small_config(tmp_path / "run"), progress=False)
    path = first.run()
    assert os.path.exists(path) and first.step == 2
    iterations, opt_vars, weights = _state(first)
    assert iterations == 2

    def files():
        return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
                for r, _, names in os.walk(tmp_path / "run") for f in names}

    before = files()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(small_config(tmp_path / "run", steps=4), progress=False).run()
    assert files() == before  # a refused run writes nothing: no event file, no config

    second = Trainer(small_config(tmp_path / "run", steps=4, resume=True), progress=False)
    assert second.backup.restore_or_start(second.ranking, second.chief, second._log)
    assert second.step == 2
    it2, opt2, w2 = _state(second)
    assert it2 == iterations
    for a, b in zip(opt2, opt_vars):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(w2, weights):
        np.testing.assert_array_equal(a, b)
    second.run()
    assert second.step == 4
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [0, 2, 4]
    record = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert {"easy_map", "medium_map", "hard_map"} <= set(record)
    # Exact: the same as four steps without the interruption.
    whole = Trainer(small_config(tmp_path / "whole", steps=4), progress=False)
    whole.run()
    for a, b in zip(whole.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="--mine_every 2"):
        Trainer(small_config(tmp_path / "run", steps=8, mine_every=4, resume=True), progress=False).run()


_WORKER = """
import json, os, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.ranking.test_trainer import small_config
from deep_retrieval.ranking.distribution import make_strategy
from deep_retrieval.ranking.trainer import Trainer
index = int(sys.argv[1])
strategy = make_strategy("multi_worker")
cfg = small_config(sys.argv[2] + f"/w{{index}}", steps=3, mine_every=1, strategy="multi_worker")
trainer = Trainer(cfg, strategy=strategy, progress=False)
trainer.run()
np.savez(sys.argv[2] + f"/weights{{index}}.npz", *[np.array(w) for w in trainer.model.get_weights()])
print("done", index, trainer.step)
"""


def test_two_workers_end_with_the_same_weights(tmp_path):
    # Generate the dataset once so the workers do not race for it.
    from deep_retrieval.data import synthetic

    synthetic.ensure_dataset(SMALL_DATA, progress=False)
    ports = [free_port(), free_port()]
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


def _rpn_config(output_dir, **overrides):
    cfg = small_config(output_dir, **{"rpn_order": "rpn_first", **overrides})
    cfg.descriptor = DescriptorConfig(backbone="tiny", weights=None, whitening_dim=16, scales=(1.0,),
                                      regions="rpn", proposals=16, pre_nms_proposals=64)
    return cfg


def test_two_stage_rpn_training_and_rpn_checkpoint(tmp_path):
    trainer = Trainer(_rpn_config(tmp_path / "run", rpn_steps=30, rpn_batch_size=4,
                                  rpn_learning_rate=3e-3, rpn_refresh_steps=0), progress=False)
    rpn_layer = trainer.model.head.rpn
    assert not any(v is w for v in rpn_layer.weights for w in trainer.model.trainable_variables)
    # The stage-1 loss on a fixed batch falls.
    frame = trainer.data.manifest.frame
    import tensorflow as tf

    from deep_retrieval.data import pipeline
    boxes = frame[["x0", "y0", "x1", "y1"]].to_numpy() / frame[["width", "height", "width", "height"]].to_numpy()
    images, norm_boxes, sizes = next(iter(pipeline.box_dataset(frame["path"].tolist(), boxes, 64, 8, seed=0)))
    assert (sizes.numpy() == [48, 64]).all()  # the facades are 96x72: their aspect kept at 64 px

    def loss():
        fmap = trainer.model.backbone(trainer.model.preprocess(images))
        h, w = fmap.shape[1:3]
        logits, deltas, anchors = rpn_layer.raw_outputs(fmap)
        labels, targets = rpn_targets.assign_targets(
            anchors, norm_boxes * np.array([w, h, w, h], "float32"), tf.ones([8], tf.bool),
            tf.random.stateless_uniform(logits.shape, [0, 0]))
        return float(rpn_targets.rpn_loss(logits, deltas, labels, targets)[0])

    before = [np.array(v) for v in rpn_layer.weights]
    loss_before = loss()
    trainer.run()
    assert loss() < 0.8 * loss_before
    stage1 = [np.array(v) for v in rpn_layer.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, stage1))
    saved = np.load(tmp_path / "run" / "rpn.weights.npz")
    assert sorted(saved.files) == sorted(v.path.split("/rpn/")[1] for v in rpn_layer.weights)

    # Stage 2 left the RPN as stage 1 trained it: the final model holds the saved weights.
    import keras
    final = keras.models.load_model(tmp_path / "run" / "model.keras").head.rpn
    for v in final.weights:
        np.testing.assert_array_equal(np.array(v), saved[v.path.split("/rpn/")[1]])

    # --rpn_checkpoint skips stage 1 and loads those weights (.npz or .keras).
    for source in ("rpn.weights.npz", "model.keras"):
        other = Trainer(_rpn_config(tmp_path / f"from_{source}", rpn_checkpoint=str(tmp_path / "run" / source)),
                        progress=False)
        other.rpn.train(other.model)
        for a, b in zip(other.model.head.rpn.weights, rpn_layer.weights):
            np.testing.assert_array_equal(np.array(a), np.array(b))
        assert not os.path.exists(tmp_path / f"from_{source}" / "rpn.weights.npz")


def test_rpn_refresh_follows_the_backbone(tmp_path):
    trainer = Trainer(_rpn_config(tmp_path / "run", rpn_steps=5, rpn_batch_size=4, steps=2, mine_every=1,
                                  rpn_refresh_steps=2), progress=False)
    trainer.run()
    # Stage 1, a refresh before the mining round at step 1, a final refresh.
    assert trainer.rpn.count == 5 + 2 + 2
    saved = np.load(tmp_path / "run" / "rpn.weights.npz")  # as stage 1 left it
    moved = [not np.array_equal(np.array(v), saved[v.path.split("/rpn/")[1]])
             for v in trainer.model.head.rpn.weights]
    assert any(moved)


def test_rpn_training_needs_boxes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image
    rows = []
    for i in range(4):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(data / f"{i}.jpg")
        rows.append(f"{i}.jpg,{i // 2}")
    (data / "m.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    trainer = Trainer(_rpn_config(tmp_path / "run", manifest=str(data / "m.csv")), progress=False)
    with pytest.raises(ValueError, match="needs landmark boxes"):
        trainer.rpn.train(trainer.model)
    # Given RPN weights, refreshing them still needs boxes: refused before training.
    from deep_retrieval.ranking.rpn_stage import save_rpn_weights
    save_rpn_weights(trainer.model.head.rpn, str(tmp_path / "rpn.npz"))
    for refresh, fails in ((5, True), (0, False)):
        other = Trainer(_rpn_config(tmp_path / f"r{refresh}", manifest=str(data / "m.csv"),
                                    rpn_checkpoint=str(tmp_path / "rpn.npz"), rpn_refresh_steps=refresh),
                        progress=False)
        if fails:
            with pytest.raises(ValueError, match="rpn_refresh_steps 0"):
                other.rpn.train(other.model)
        else:
            other.rpn.train(other.model)
    missing = Trainer(_rpn_config(tmp_path / "run2", manifest=str(data / "m.csv"),
                                  rpn_checkpoint=str(tmp_path / "nope.npz")), progress=False)
    with pytest.raises(ValueError, match="no such file"):
        missing.rpn.train(missing.model)


def test_initial_model_is_the_step_zero_model(tmp_path):
    import keras

    from deep_retrieval.data import groundtruth, synthetic
    from deep_retrieval.retrieval import extraction

    trainer = Trainer(small_config(tmp_path / "run"), progress=False)
    trainer.run()
    run = tmp_path / "run"
    first = json.loads(open(run / "metrics.jsonl").readline())
    assert first["step"] == 0
    initial = keras.models.load_model(run / "initial.keras")
    data = groundtruth.load_dataset(synthetic.ensure_dataset(SMALL_DATA, progress=False), "synthetic")
    results = extraction.evaluate_model(extraction.model_describer(initial, 64, progress=False), data)
    assert abs(results["medium"]["map"] - first["medium_map"]) < 1e-3
    # Training moved the weights; model.keras is the better scored of the two.
    assert any(not np.array_equal(a, b) for a, b in zip(initial.get_weights(), trainer.model.get_weights()))
    last = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    kept = keras.models.load_model(run / "model.keras")
    expected = trainer.model if last["medium_map"] > first["medium_map"] else initial
    for a, b in zip(kept.get_weights(), expected.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert initial.image_size == kept.image_size == 64  # the training size travels with the model


def test_model_keras_holds_the_selected_step_across_a_resume(tmp_path):
    import keras

    trainer = Trainer(small_config(tmp_path / "run"), progress=False)
    os.makedirs(tmp_path / "run")
    marker = trainer.model.head.pca.mean  # marks which model model.keras holds
    scores = {0: 50.0, 2: 60.0, 4: 55.0, 6: 60.0}  # step 2 is best; step 6 only ties it

    def evaluated(step, trainer):
        marker.assign(np.full(marker.shape, float(step), "float32"))
        records = [{"step": step, "dataset": "synthetic", "medium_map": scores[step]}]
        with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
            f.write(json.dumps(records[0]) + "\n")
        trainer.selection.select(records)
        trainer.selection.earlier(step).extend(records)
        return keras.models.load_model(tmp_path / "run" / "model.keras").head.pca.mean.numpy()[0]

    assert [evaluated(step, trainer) for step in (0, 2, 4)] == [0.0, 2.0, 2.0]
    # A resumed run reads the best so far from metrics.jsonl.
    resumed = Trainer(small_config(tmp_path / "run", resume=True), progress=False)
    resumed.model.head.pca.mean.assign(np.zeros(marker.shape, "float32"))
    marker = resumed.model.head.pca.mean
    assert evaluated(6, resumed) == 2.0 and resumed.best == (0.2, -2)


def test_cached_frozen_trunk_run_resumes_exactly(tmp_path):
    first = Trainer(small_config(tmp_path / "run", train_from="conv3_1"), progress=False)
    assert first.part is not None
    first.run()
    # conv2_2's output: 64x48 images at a quarter, 32 channels.
    assert first.rounds.maps.shape == (len(first.paths), 12, 16, 32)
    second = Trainer(small_config(tmp_path / "run", train_from="conv3_1", steps=4, resume=True), progress=False)
    second.run()
    whole = Trainer(small_config(tmp_path / "whole", train_from="conv3_1", steps=4), progress=False)
    whole.run()
    for a, b in zip(whole.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Without the cache the same run recomputes the trunk (and augments the images).
    plain = Trainer(small_config(tmp_path / "plain", train_from="conv3_1", cache_features=False), progress=False)
    assert plain.part is None


def test_train_from_freezes_the_layers_before(tmp_path):
    cfg = small_config(tmp_path / "run", train_from="conv3_1")
    trainer = Trainer(cfg, progress=False)
    names = [layer.name for layer in trainer.model.backbone.layers]
    cut = names.index("conv3_1")
    before = [np.array(w) for layer in trainer.model.backbone.layers[:cut] for w in layer.weights]
    trainable = {id(v) for v in trainer.model.trainable_variables}
    assert not any(id(w) in trainable for layer in trainer.model.backbone.layers[:cut] for w in layer.weights)
    assert all(id(w) in trainable for w in trainer.model.backbone.get_layer("conv3_1").trainable_weights)
    trainer.run()
    after = [np.array(w) for layer in trainer.model.backbone.layers[:cut] for w in layer.weights]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no layer of the tiny backbone"):
        Trainer(small_config(tmp_path / "other", train_from="blocks_9"), progress=False)


def test_images_failing_in_mining_are_reported_and_kept_out(tmp_path, capsys):
    trainer = Trainer(small_config(tmp_path / "run"), progress=False)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")  # the file changed on disk after the manifest was read
    trainer.paths[1] = str(broken)
    triplets = trainer.mine(0)
    assert trainer.unusable == {1}
    assert "mining round 0: 1 image(s) failed to decode and are left out of training" in capsys.readouterr().out
    assert len(triplets) and 1 not in triplets


def _frozen_bn_config(tmp_path, **overrides):
    """`small_config` with a backbone loaded from a weights file, so its
    batch norm is frozen (as with pretrained weights)."""
    from deep_retrieval.backbones import registry

    weights = tmp_path / "tiny.weights.h5"
    if not weights.exists():
        registry.build_backbone("tiny")[0].save_weights(weights)
    cfg = small_config(tmp_path / "run", optimizer="sgd", momentum=0.0, learning_rate=0.1, **overrides)
    cfg.descriptor = dataclasses.replace(cfg.descriptor, weights=str(weights))
    return cfg


def _one_step(cfg, images, prepare=None):
    import keras
    import tensorflow as tf

    trainer = Trainer(cfg, progress=False)
    if prepare:
        prepare(trainer)
    keras.utils.set_random_seed(0)
    before = [np.array(v) for v in trainer.model.trainable_variables]
    part = len(images[0]) // trainer.micro_steps
    for i in range(trainer.micro_steps):  # micro-batches, as fit feeds them
        trainer.ranking.train_on_batch({k: tf.constant(x[i * part:(i + 1) * part]) for k, x in zip(STREAMS, images)})
    return before, [np.array(v) for v in trainer.model.trainable_variables]


def _triplet_batch(batch):

    rng = np.random.RandomState(1)
    return [rng.uniform(0, 255, (batch, 48, 64, 3)).astype("float32") for _ in range(3)]


def test_accumulated_micro_batches_give_the_full_batch_update(tmp_path):
    images = _triplet_batch(4)
    w0, full = _one_step(_frozen_bn_config(tmp_path, batch_size=4, weight_decay=0.0), images)
    w0b, micro = _one_step(_frozen_bn_config(tmp_path, batch_size=4, weight_decay=0.0, accumulate_steps=2), images)
    for a, b in zip(w0, w0b):
        np.testing.assert_array_equal(a, b)
    moved = max(np.abs(a - b).max() for a, b in zip(full, w0))
    assert moved > 1e-4  # the step did something
    for a, b in zip(full, micro):
        np.testing.assert_allclose(a, b, atol=1e-6 + 1e-4 * moved)
    with pytest.raises(ValueError, match="must be at least 1 and divide"):
        _frozen_bn_config(tmp_path, batch_size=4, accumulate_steps=3)


def test_l2_weight_decay_is_caffe_style(tmp_path):
    # SGD without momentum, lr 0.1: Caffe's decay adds lambda * w to the
    # gradient, so the two runs differ by exactly -lr * lambda * w0.
    images = _triplet_batch(2)
    w0, plain = _one_step(_frozen_bn_config(tmp_path, batch_size=2, weight_decay=0.0), images)
    _, decayed = _one_step(_frozen_bn_config(tmp_path, batch_size=2, weight_decay=0.01), images)
    for w, a, b in zip(w0, plain, decayed):
        np.testing.assert_allclose(b - a, -0.1 * 0.01 * w, atol=1e-6)


def test_l2_sp_pulls_toward_the_start_point(tmp_path):
    # SGD without momentum, lr 0.1: L2-SP adds beta * (w - w0) to the
    # gradient. With w0 set 0.5 below the weights, the runs differ by exactly
    # -lr * beta * 0.5 = -0.01 for beta = 0.2, whatever the weight.
    images = _triplet_batch(2)

    def lowered_start(trainer):
        trainer.ranking.set_start_point()
        for start in trainer.ranking.start_point:
            start.assign(start - 0.5)

    w0, plain = _one_step(_frozen_bn_config(tmp_path, batch_size=2, weight_decay=0.0), images)
    _, pulled = _one_step(_frozen_bn_config(tmp_path, batch_size=2, weight_decay=0.0, l2_sp=0.2), images,
                          lowered_start)
    for a, b in zip(plain, pulled):
        np.testing.assert_allclose(b - a, -0.01, atol=1e-6)


def test_distillation_term_is_the_distance_to_the_start_descriptors(tmp_path):
    import tensorflow as tf
    from keras import ops

    trainer = Trainer(_frozen_bn_config(tmp_path, batch_size=2, weight_decay=0.0, distill=0.5), progress=False)
    images = {k: tf.constant(x) for k, x in zip(STREAMS, _triplet_batch(2))}
    ranking = trainer.ranking
    ranking.set_start_point()
    now = np.asarray(ranking(images, training=False))
    # At the start point the student is its own teacher.
    np.testing.assert_allclose(np.asarray(ranking.start_descriptors(images)), now, atol=1e-6)
    # Moved start point: the teacher is the network with those weights,
    # computed here by loading them into the model.
    for start in ranking.start_point:
        start.assign(start * 0.9 + 0.01)
    teacher = np.asarray(ranking.start_descriptors(images))
    current = [np.array(v) for v in trainer.model.trainable_variables]
    for v, start in zip(trainer.model.trainable_variables, ranking.start_point):
        v.assign(start)
    np.testing.assert_allclose(teacher, np.asarray(ranking(images, training=False)), atol=1e-5)
    for v, value in zip(trainer.model.trainable_variables, current):
        v.assign(value)
    assert np.abs(teacher - now).max() > 1e-3
    plain = ranking.compute_loss(images, None, ops.convert_to_tensor(now), training=False)
    ranking.distill = 0.0
    without = ranking.compute_loss(images, None, ops.convert_to_tensor(now), training=False)
    expected = 0.5 * np.mean(np.sum((now - teacher) ** 2, axis=-1))
    assert float(plain) - float(without) == pytest.approx(expected, rel=1e-4)


def test_mixed_aspect_triplets_run_one_by_one_at_their_own_sizes(tmp_path):
    import keras
    import tensorflow as tf

    from deep_retrieval.backbones import registry
    from deep_retrieval.model.descriptor_model import build_descriptor_model
    from deep_retrieval.ranking.siamese import RankingModel

    weights = tmp_path / "tiny.weights.h5"
    registry.build_backbone("tiny")[0].save_weights(weights)  # from a file: batch norm frozen
    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=str(weights), whitening_dim=8,
                                                    scales=(1.0,)))
    for layer in model.backbone.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    variables = model.trainable_variables
    rng = np.random.RandomState(2)
    sizes = [[(48, 64), (64, 32), (40, 40)], [(64, 48), (48, 64), (32, 64)]]
    triplets = [[rng.uniform(0, 255, (1, h, w, 3)).astype("float32") for h, w in triplet] for triplet in sizes]
    # Reference: each triplet's hinge at its own sizes, by hand.
    want, total = [np.zeros(v.shape) for v in variables], 0.0
    for triplet in triplets:
        with tf.GradientTape() as tape:
            q, p, n = [model.single_scale(tf.constant(x), training=True) for x in triplet]
            hinge = tf.nn.relu(0.1 + tf.reduce_sum((q - p) ** 2) - tf.reduce_sum((q - n) ** 2))
        total += float(hinge)
        want = [a + np.asarray(g) / 2 for a, g in zip(want, tape.gradient(hinge, variables))]
    # The trainer's setting for a batch of two mixed-size triplets: one
    # triplet per call, two calls accumulated into one SGD update.
    ranking = RankingModel(model, 0.1, triplets_per_step=1)
    ranking.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), jit_compile=False)
    w0 = [np.array(v) for v in variables]
    ranking.train_on_batch(dict(zip(STREAMS, triplets[0])))
    for v, w in zip(variables, w0):
        np.testing.assert_array_equal(np.array(v), w)  # accumulated, not applied yet
    ranking.train_on_batch(dict(zip(STREAMS, triplets[1])))
    assert total > 0
    moved = max(np.abs(np.array(v) - w).max() for v, w in zip(variables, w0))
    assert moved > 1e-5
    for v, w, g in zip(variables, w0, want):
        np.testing.assert_allclose(np.array(v), w - 0.1 * g, rtol=1e-4, atol=1e-6)


def test_trainer_detects_mixed_aspect_collections(tmp_path):
    import pandas as pd
    from PIL import Image

    rows = []
    for label in range(4):
        for j, (h, w) in enumerate([(48, 64), (64, 40), (50, 50)]):
            name = f"{label}_{j}.png"
            Image.fromarray(np.random.RandomState(label * 3 + j).randint(0, 256, (h, w, 3)).astype(np.uint8)).save(
                tmp_path / name)
            rows.append({"image": name, "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = small_config(tmp_path / "run", manifest=str(tmp_path / "m.csv"), data_dir=str(tmp_path))
    trainer = Trainer(cfg, progress=False)
    assert trainer.mixed_sizes
    trainer.run()  # two steps, triplet by triplet
    assert os.path.exists(tmp_path / "run" / "model.keras")
    uniform = Trainer(small_config(tmp_path / "facades"), progress=False)
    assert not uniform.mixed_sizes  # the facades are all 96x72


def test_paper_order_ranks_with_the_grid_then_learns_the_rpn_on_frozen_features(tmp_path):
    import keras

    cfg = small_config(tmp_path / "run", rpn_steps=5, rpn_batch_size=4, rpn_order="grid_first",
                       rpn_refresh_steps=0)
    cfg.descriptor = DescriptorConfig(backbone="tiny", weights=None, whitening_dim=16, scales=(1.0,),
                                      regions="rpn", proposals=16, pre_nms_proposals=64)
    trainer = Trainer(cfg, progress=False)
    assert trainer.model.head.rpn is None  # the ranking pools the rigid grid
    trainer.run()
    ranked = trainer.ranking.descriptor  # the grid model the ranking trained
    final = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert final.head.rpn is not None and trainer.rpn.count == 5
    for a, b in zip(final.backbone.get_weights(), ranked.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)  # the RPN learned on frozen features
    for a, b in zip(final.head.pca.get_weights(), ranked.head.pca.get_weights()):
        np.testing.assert_array_equal(a, b)
    saved = np.load(tmp_path / "run" / "rpn.weights.npz")
    for v in final.head.rpn.weights:
        np.testing.assert_array_equal(np.array(v), saved[v.path.split("/rpn/")[1]])
    initial = keras.models.load_model(tmp_path / "run" / "initial.keras")
    assert initial.head.rpn is None
    with pytest.raises(ValueError, match="needs `rpn_order='rpn_first'`"):
        small_config(tmp_path / "x", rpn_order="grid_first")  # the tiny preset refreshes its RPN


_JAX = """
import dataclasses, os, pathlib, sys
os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, {root!r})
import keras
import numpy as np
from deep_retrieval.ranking.siamese import STREAMS
from deep_retrieval.ranking.trainer import Trainer
from tests.ranking.test_trainer import _frozen_bn_config
assert keras.backend.backend() == "jax"
tmp = pathlib.Path(sys.argv[1])
cfg = dataclasses.replace(_frozen_bn_config(tmp, batch_size=2, weight_decay=0.0), output_dir=str(tmp / "jax"))
trainer = Trainer(cfg, progress=False)
data = np.load(tmp / "start.npz")
trainer.model.set_weights([data[f"w{{i}}"] for i in range(len(trainer.model.weights))])
trainer.ranking.train_on_batch({{k: data[k] for k in STREAMS}})
np.savez(tmp / "jax_step.npz", *[np.asarray(v) for v in trainer.model.trainable_variables])
path = trainer.run()
model = keras.models.load_model(path)
print("trained", trainer.step, model.image_size, type(model.backbone.weights[0].value).__module__)
"""


def test_ranking_training_runs_on_the_jax_backend(tmp_path):
    """One SGD step of the ranking model on JAX equals a hand-written
    TensorFlow step from the same weights, and a whole run completes."""
    import tensorflow as tf

    cfg = _frozen_bn_config(tmp_path, batch_size=2, weight_decay=0.0)
    model = Trainer(cfg, progress=False).model
    images = _triplet_batch(2)
    np.savez(tmp_path / "start.npz", **{f"w{i}": np.array(w) for i, w in enumerate(model.get_weights())},
             **dict(zip(STREAMS, images)))
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        q, p, n = [model.single_scale(tf.constant(x), training=True) for x in images]
        hinges = tf.nn.relu(0.1 + tf.reduce_sum((q - p) ** 2, -1) - tf.reduce_sum((q - n) ** 2, -1))
        loss = tf.reduce_sum(hinges) / 2
    assert float(loss) > 0
    want = [np.array(v) - 0.1 * np.asarray(g) for v, g in zip(variables, tape.gradient(loss, variables))]
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", _JAX.format(root=ROOT), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "trained 3 64 jax" in done.stdout  # the step above, then the run's two
    got = np.load(tmp_path / "jax_step.npz")
    assert len(got.files) == len(want)
    moved = max(np.abs(w - np.array(v)).max() for w, v in zip(want, variables))
    assert moved > 1e-4
    for key, w in zip(got.files, want):
        np.testing.assert_allclose(got[key], w, rtol=1e-4, atol=1e-5)
    assert os.path.exists(tmp_path / "jax" / "checkpoints" / "round-000001" / "latest.weights.h5")
