"""The Keras callbacks of ranking training (`deep_retrieval.ranking.trainer`).

One ``fit`` epoch is one mining round of ``mine_every`` steps: `Mining`
re-mines hard negatives at its start, `Evaluation` and `Backup` act at the
end of the rounds that reach a multiple of ``eval_every`` or
``checkpoint_every``, and `Progress` shows the steps.
"""

import json
import os
import shutil

import keras
import numpy as np
from tqdm import tqdm

from deep_retrieval.io.atomic import atomic_text


def _reached(every, round_index, steps_per_round):
    """Whether round ``round_index`` (0-based) ends at or first passes a
    multiple of ``every`` steps."""
    if not every:
        return False
    end = (round_index + 1) * steps_per_round
    return end // every > (end - steps_per_round) // every


class Mining(keras.callbacks.Callback):
    """Starts every round: `Trainer.start_round` mines the triplets that the
    input pipeline reads during it, with the weights the round starts from."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.trainer.rounds.index:
            self.trainer.start_round(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.trainer.rounds.check(epoch)


class Evaluation(keras.callbacks.Callback):
    """Scores the validation splits (`Trainer.evaluate`), which select the
    saved model, after the rounds that reach a multiple of ``eval_every``
    (not the last one: the trainer evaluates the final model itself); the
    scores join the epoch's logs, so `keras.callbacks.TensorBoard` records
    them."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        c = self.trainer.config
        step = (epoch + 1) * c.mine_every
        if step < c.steps and _reached(c.eval_every, epoch, c.mine_every):
            records = self.trainer.evaluate(step)
            if records is not None and logs is not None:
                logs.update({f"eval_{r['dataset']}_{k}": v for r in records for k, v in r.items()
                             if k not in ("step", "time", "dataset")})


class Backup(keras.callbacks.Callback):
    """`keras.callbacks.BackupAndRestore` at round boundaries, made atomic.

    After the rounds that reach a multiple of ``checkpoint_every`` steps,
    and after the last, a `keras.callbacks.BackupAndRestore` writes model
    and optimizer state to a new folder ``round-NNNNNN``; once complete, the
    ``latest`` file is pointed at it (atomically) and older folders but the
    previous one go (renamed ``*.deleting``, then removed). A kill at any
    moment leaves ``latest`` naming a complete backup, and every
    ``round-NNNNNN`` folder complete. Restoring (`restore`, or at the start of ``fit``) has
    Keras's callback load it and set the epoch ``fit`` resumes at. Rounds
    restart at their beginning, so a resumed run re-mines what the
    uninterrupted run mined and continues it exactly.

    Args:
        backup_dir: where the backups live (its own folder per worker).
        config: the `TrainConfig`.
    """

    def __init__(self, backup_dir, config):
        super().__init__()
        self.backup_dir, self.config = backup_dir, config
        self._restored = False

    @property
    def latest(self):
        """The folder of the latest complete backup, or None."""
        pointer = os.path.join(self.backup_dir, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            folder = os.path.join(self.backup_dir, f.read().strip())
        return folder if os.path.isdir(folder) else None

    def restore(self, model):
        """Loads the latest backup into ``model`` (a compiled `RankingModel`)."""
        keras_backup = keras.callbacks.BackupAndRestore(self.latest, delete_checkpoint=False)
        keras_backup.set_model(model)
        keras_backup.on_train_begin()
        self._restored = True

    def restore_or_start(self, model, chief, log):
        """Restores the latest backup into ``model`` when resuming (True);
        refuses to overwrite a run (the chief, ``chief``); ``log`` prints."""
        c = self.config
        if chief and not c.resume and self.latest:
            raise ValueError(
                f"{c.output_dir} already holds a run ({self.backup_dir}); pass "
                "--resume to continue it or choose another --output_dir."
            )
        if c.resume and self.latest:
            previous = os.path.join(c.output_dir, "config.json")
            if os.path.exists(previous):
                with open(previous) as f:
                    before = json.load(f).get("mine_every")
                if before not in (None, c.mine_every):
                    raise ValueError(f"--resume needs the run's --mine_every {before} (a backup counts "
                                     f"mining rounds), not {c.mine_every}.")
            self.restore(model)
            log(f"resumed from {self.latest} at step {int(keras.ops.convert_to_numpy(model.optimizer.iterations))}")
            return True
        if c.resume:
            log("no checkpoint to resume from: starting a new run")
        return False

    def on_train_begin(self, logs=None):
        if not self._restored and self.latest:
            self.restore(self.model)

    def on_epoch_end(self, epoch, logs=None):
        c = self.config
        if not (_reached(c.checkpoint_every, epoch, c.mine_every) or (epoch + 1) * c.mine_every >= c.steps):
            return
        name = f"round-{epoch + 1:06d}"
        target = os.path.join(self.backup_dir, name)
        partial = target + ".partial"
        for stale in (partial, target):
            shutil.rmtree(stale, ignore_errors=True)
        keras_backup = keras.callbacks.BackupAndRestore(partial, delete_checkpoint=False)
        keras_backup.set_model(self.model)
        keras_backup.on_epoch_end(epoch)  # writes the weights and {"epoch": epoch + 1}
        previous = self.latest
        os.replace(partial, target)
        atomic_text(os.path.join(self.backup_dir, "latest"), name)
        keep = {name, os.path.basename(previous) if previous else None}
        for entry in os.listdir(self.backup_dir):
            if entry.startswith("round-") and entry not in keep:
                doomed = os.path.join(self.backup_dir, entry)
                if not entry.endswith(".deleting"):
                    # Renamed first: a kill during the removal leaves a ".deleting"
                    # folder, never a half-removed one under a round's name.
                    shutil.rmtree(doomed + ".deleting", ignore_errors=True)
                    os.replace(doomed, doomed + ".deleting")
                    doomed += ".deleting"
                shutil.rmtree(doomed, ignore_errors=True)


class Progress(keras.callbacks.Callback):
    """A tqdm bar over the run's optimizer steps with the current loss."""

    def __init__(self, steps, initial, micro_steps, enabled):
        super().__init__()
        self.steps, self.initial, self.micro_steps, self.enabled = steps, initial, micro_steps, enabled
        self.bar = None

    def on_train_begin(self, logs=None):
        self.bar = tqdm(total=self.steps, initial=self.initial, desc="training", unit="step",
                        disable=not self.enabled)

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.micro_steps == 0:
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(np.ravel(logs['loss'])[0]):.4f}")
            self.bar.update()

    def on_train_end(self, logs=None):
        self.bar.close()
