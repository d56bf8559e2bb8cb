"""`RoutingStatistics`: per-MoE-layer routing statistics in the epoch logs.

`write_scalars` writes numbers as TensorBoard scalar summaries with
TensorFlow alone (`keras.callbacks.TensorBoard` needs the separate
`tensorboard` package, which is not a dependency of keras_vmoe).
`tracking_statistics` makes inference (e.g. `predict`) update the MoE
layers' statistics for a while, which by default only training does.
"""

import contextlib
import os
import warnings

import keras
from keras import ops

from keras_vmoe.layers.moe import STATISTICS, TRACK_STATISTICS, MoE


def moe_layers(model):
    """Every `MoE` layer inside `model`, in build order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoE)
    ]


@contextlib.contextmanager
def tracking_statistics(model, mode="always"):
    """Sets `track_statistics` of every `MoE` layer of `model` in the block.

    By default the MoE layers update their statistics variables on training
    calls only; inside `with tracking_statistics(model):` every call of
    `model` does (`mode="always"`), e.g. so that a callback can read the
    statistics of each `predict` batch. The previous settings come back at
    the end of the block. Because a compiled step keeps the setting it was
    traced with, `model`'s compiled train, test and predict functions are
    dropped at both ends of the block (Keras traces them again on their
    next use) when the setting changes; other models sharing the layers
    must not run their compiled steps inside the block.

    Args:
        model: a model containing `MoE` layers.
        mode: str. One of `"training"`, `"always"`, `"never"` (see
            `MoE`). Defaults to `"always"`.

    Example:

    ```python
    with tracking_statistics(model):
        model.predict(x, callbacks=[ReadsStatisticsAfterEachBatch()])
    ```
    """
    if mode not in TRACK_STATISTICS:
        raise ValueError(
            f"`mode` must be one of {list(TRACK_STATISTICS)}, got {mode!r}."
        )
    layers = moe_layers(model)
    previous = [layer.track_statistics for layer in layers]
    changed = any(setting != mode for setting in previous)
    for layer in layers:
        layer.track_statistics = mode
    if changed:
        _drop_compiled_functions(model)
    try:
        yield
    finally:
        for layer, setting in zip(layers, previous):
            layer.track_statistics = setting
        if changed:
            _drop_compiled_functions(model)


def _drop_compiled_functions(model):
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def write_scalars(writer, values, step):
    """Writes `{tag: number}` as TensorBoard scalars at `step`.

    Uses `tf.summary.write` with the scalars plugin's metadata (what
    `tf.summary.scalar` writes), so it needs TensorFlow but not the
    `tensorboard` package; `tensorboard --logdir` shows the result.

    Args:
        writer: a `tf.summary.create_file_writer(log_dir)`.
        values: dict of str to float.
        step: int. The x axis value (the epoch).
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )
    with writer.as_default():
        for tag, value in values.items():
            tf.summary.write(
                tag, tf.constant(float(value), tf.float32), step=step, metadata=metadata
            )
    writer.flush()


class RoutingStatistics(keras.callbacks.Callback):
    """Writes each MoE layer's routing statistics into the epoch logs.

    For every `MoE` layer it adds `routing/{layer path}/{statistic}` (the
    path, e.g. `encoder_block_3/moe`, keeps layers of the same name apart) with the
    statistics of the layer's last training batch: `auxiliary_loss`,
    `fraction_tokens_dropped`, `experts_per_token`, `load_imbalance` (max
    over mean expert load). Layers built with `track_statistics="never"`
    are left out (with a warning). `History`, `CSVLogger` and
    `keras.callbacks.TensorBoard` see them when they come after this callback
    in the `callbacks` list. With `log_dir`, the callback also writes them
    to TensorBoard itself (tag = log key, step = epoch), without the
    `tensorboard` package that Keras' callback needs.

    Args:
        statistics: sequence of str. Which statistics to log. Defaults to all.
        log_dir: str or None. Folder for TensorBoard event files. Defaults
            to `None` (logs only).

    Example:
    >>> # model.fit(x, y, callbacks=[RoutingStatistics(log_dir="logs/routing")])
    >>> # then: tensorboard --logdir logs
    """

    def __init__(self, statistics=STATISTICS, log_dir=None):
        super().__init__()
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(
                f"`log_dir` must be a folder path or None, got {log_dir!r}."
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._writer = None
        if isinstance(statistics, str) or not hasattr(statistics, "__iter__"):
            raise ValueError(
                f"`statistics` must be a sequence of names, got {statistics!r}; "
                f"choose from {list(STATISTICS)}."
            )
        unknown = set(statistics) - set(STATISTICS)
        if unknown:
            raise ValueError(
                f"Unknown `statistics` {sorted(unknown)}; choose from {list(STATISTICS)}."
            )
        self.statistics = tuple(statistics)
        self._train_values = {}

    def _layers(self):
        return [
            layer
            for layer in moe_layers(self.model)
            if layer.track_statistics != "never"
        ]

    def _read(self):
        values = {}
        for layer in self._layers():
            for name in self.statistics:
                value = ops.convert_to_numpy(getattr(layer, name))
                values[f"routing/{getattr(layer, 'path', layer.name)}/{name}"] = float(
                    value
                )
        return values

    def on_train_begin(self, logs=None):
        untracked = [
            getattr(layer, "path", layer.name)
            for layer in moe_layers(self.model)
            if layer.track_statistics == "never"
        ]
        if untracked:
            warnings.warn(
                f"RoutingStatistics: MoE layers {untracked} have "
                '`track_statistics="never"`; their statistics are not logged.',
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._train_values = {}

    def on_epoch_end(self, epoch, logs=None):
        # Validation (if any) has run by now; layers that track statistics
        # "always" have overwritten them, so report what was read after
        # training.
        values = self._train_values or self._read()
        if logs is not None:
            logs.update(values)
        if self.log_dir is not None:
            if self._writer is None:
                import tensorflow as tf

                self._writer = tf.summary.create_file_writer(self.log_dir)
            write_scalars(self._writer, values, epoch)
        self._train_values = {}

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_test_begin(self, logs=None):
        # Called for validation inside fit(): keep the training values first.
        if self.model is not None and not self._train_values:
            self._train_values = self._read()
