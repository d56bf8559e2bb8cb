"""Backups of sharded training state with Orbax (JAX, one or many processes).

`OrbaxBackupAndRestore` is `BackupAndRestoreWithRNG` for models whose
weights are sharded over a device mesh, possibly across processes: every
process writes only the shards it holds (Orbax, through TensorStore), and
on restore each array is read straight into the sharding of the variable
it belongs to. No process ever gathers the whole model.
"""

import os
import re
import shutil

import keras

from keras_vmoe.training.recipe import seed_state_variables, use_seeded_dropout

_STEP = re.compile(r"\d+")


def _state_variables(model):
    """The variables a backup holds, by group, in a stable order."""
    optimizer = model.optimizer
    return {
        "trainable": list(model.trainable_variables),
        "non_trainable": list(model.non_trainable_variables),
        "optimizer": list(optimizer.variables) if optimizer is not None else [],
        "seeds": seed_state_variables(model),
    }


class OrbaxBackupAndRestore(keras.callbacks.Callback):
    """Backs up weights, optimizer and seed states each epoch with Orbax.

    Like `keras_vmoe.training.BackupAndRestoreWithRNG` (and Keras'
    `BackupAndRestore`): at the end of every epoch the trainable and
    non-trainable weights, the optimizer variables and the layers'
    `SeedGenerator` states are saved to `backup_dir/<epoch>`; when `fit()`
    starts again, the latest complete backup is restored and training
    continues at the epoch after it. Orbax writes each backup into a
    temporary folder renamed into place when complete, so a process killed
    while saving leaves the previous backup usable.

    With JAX's distributed runtime (`jax.distributed.initialize`) every
    process must use the callback with the same folder on a shared file
    system: each writes the shards it holds. JAX backend only.

    Args:
        backup_dir: str. Folder of the backups (used by this callback only).
        delete_checkpoint: bool. Delete the backups when `fit()` completes.
            Defaults to `True`.

    Example:

    ```python
    backup = OrbaxBackupAndRestore("run/backup")
    model.fit(x, y, epochs=10, shuffle=False, callbacks=[backup])
    ```
    """

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__()
        if keras.backend.backend() != "jax":
            raise ValueError(
                "OrbaxBackupAndRestore needs the JAX backend; use "
                "BackupAndRestoreWithRNG on other backends."
            )
        self.backup_dir = os.path.abspath(backup_dir)
        self.delete_checkpoint = delete_checkpoint
        self._manager = None

    @staticmethod
    def resume_epoch(backup_dir):
        """The epoch a `fit()` with backups in `backup_dir` starts at (0: none).

        Example:
        >>> OrbaxBackupAndRestore.resume_epoch("/no/such/folder")
        0
        """
        if not os.path.isdir(backup_dir):
            return 0
        steps = [
            int(name)
            for name in os.listdir(backup_dir)
            if _STEP.fullmatch(name)
            and os.path.isfile(os.path.join(backup_dir, name, "_CHECKPOINT_METADATA"))
        ]
        return max(steps, default=0)

    def _checkpoint_manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            self._manager = ocp.CheckpointManager(
                self.backup_dir,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, create=True, enable_async_checkpointing=False
                ),
            )
        return self._manager

    def on_train_begin(self, logs=None):
        use_seeded_dropout(self.model)
        epoch = self.resume_epoch(self.backup_dir)
        if not epoch:
            return
        import jax
        import orbax.checkpoint as ocp

        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables = _state_variables(model)

        def target(variable):
            value = variable.value
            return jax.ShapeDtypeStruct(
                value.shape, value.dtype, sharding=value.sharding
            )

        abstract = {k: [target(v) for v in vs] for k, vs in variables.items()}
        try:
            restored = self._checkpoint_manager().restore(
                epoch, args=ocp.args.StandardRestore(abstract)
            )
        except ValueError as e:
            raise ValueError(
                f"The backup in {self.backup_dir} does not fit this model "
                f"(another model or optimizer?): {e}"
            ) from None
        for key, group in variables.items():
            for variable, value in zip(group, restored[key], strict=True):
                variable.assign(value)
        model._initial_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        import orbax.checkpoint as ocp

        state = {
            k: [v.value for v in vs] for k, vs in _state_variables(self.model).items()
        }
        manager = self._checkpoint_manager()
        manager.save(epoch + 1, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()

    def on_train_end(self, logs=None):
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
        if self.delete_checkpoint:
            import jax

            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("orbax_backup_delete")
            if jax.process_index() == 0:
                shutil.rmtree(self.backup_dir, ignore_errors=True)
