"""`RoutingStatistics`: per-MoE-layer routing statistics in the epoch logs."""

import keras
from keras import ops

from keras_vmoe.layers.moe import STATISTICS, MoE


def moe_layers(model):
    """Every `MoE` layer inside `model`, in build order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoE)
    ]


class RoutingStatistics(keras.callbacks.Callback):
    """Writes each MoE layer's routing statistics into the epoch logs.

    For every `MoE` layer it adds `routing/{layer path}/{statistic}` (the
    path, e.g. `encoder_block_3/moe`, keeps layers of the same name apart) with the
    statistics of the layer's last training batch: `auxiliary_loss`,
    `fraction_tokens_dropped`, `experts_per_token`, `load_imbalance` (max
    over mean expert load). `History`, `CSVLogger` and `TensorBoard` see them
    when they come after this callback in the `callbacks` list.

    Args:
        statistics: sequence of str. Which statistics to log. Defaults to all.

    Example:
    >>> # model.fit(x, y, callbacks=[RoutingStatistics(),
    >>> #                            keras.callbacks.TensorBoard("logs")])
    """

    def __init__(self, statistics=STATISTICS):
        super().__init__()
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

    def _read(self):
        values = {}
        for layer in moe_layers(self.model):
            for name in self.statistics:
                value = ops.convert_to_numpy(getattr(layer, name))
                values[f"routing/{getattr(layer, 'path', layer.name)}/{name}"] = float(
                    value
                )
        return values

    def on_epoch_begin(self, epoch, logs=None):
        self._train_values = {}

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            # Validation (if any) has run by now and overwritten the layer
            # variables, so report what was captured after training.
            logs.update(self._train_values or self._read())
        self._train_values = {}

    def on_test_begin(self, logs=None):
        # Called for validation inside fit(): keep the training values first.
        if self.model is not None and not self._train_values:
            self._train_values = self._read()
