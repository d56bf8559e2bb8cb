"""Progress lines with an estimate of the time left, and the epoch timer.

One line per epoch says which model (of how many), which seed and epoch is
running, the epoch's loss and accuracy, and the estimated time left for the
whole study. The estimate uses the runs finished so far (their mean
duration); during the first run it extrapolates from the epochs seen.
"""

import sys
import time

import keras


def format_duration(seconds):
    """`"1h02m"`, `"4m05s"` or `"12s"`.

    Example:
    >>> format_duration(3725), format_duration(245), format_duration(12.4)
    ('1h02m', '4m05s', '12s')
    """
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class StudyProgress:
    """Tracks the runs of a study and prints progress lines.

    Args:
        total_runs: int. Models times seeds.
        epochs: int. Epochs per run.
        stream: file. Where to print. Defaults to `sys.stdout`.

    Example:
    >>> import io
    >>> progress = StudyProgress(total_runs=2, epochs=1, stream=io.StringIO())
    >>> progress.start_run("dense", seed=0)
    >>> progress.end_epoch(0, {"loss": 1.0, "accuracy": 0.5})
    >>> "[1/2] dense seed 0  epoch 1/1" in progress.stream.getvalue()
    True
    """

    def __init__(self, total_runs, epochs, stream=None):
        self.total_runs = int(total_runs)
        self.epochs = int(epochs)
        self.stream = stream or sys.stdout
        self.finished = []  # durations of the finished runs
        self.run_index = 0
        self.epoch_seconds = []
        self.model_name = None
        self.seed = None
        self.run_start = self.epoch_start = time.perf_counter()
        self.study_start = time.perf_counter()

    def print(self, text):
        print(text, file=self.stream, flush=True)

    def start_run(self, model_name, seed):
        self.run_index += 1
        self.model_name, self.seed = model_name, seed
        self.run_start = self.epoch_start = time.perf_counter()
        self.epoch_seconds = []

    def start_epoch(self):
        self.epoch_start = time.perf_counter()

    def end_run(self):
        self.finished.append(time.perf_counter() - self.run_start)

    def seconds_left(self):
        """Estimated seconds until the study ends."""
        in_run = time.perf_counter() - self.run_start
        runs_after = self.total_runs - self.run_index
        # This run: its remaining epochs at the pace of its latest epoch
        # (the first one also compiles), plus ~10% for the evaluation.
        latest = self.epoch_seconds[-1] if self.epoch_seconds else 0.0
        epochs_left = self.epochs - len(self.epoch_seconds)
        this_run = 1.1 * (sum(self.epoch_seconds) + epochs_left * latest)
        if self.finished:
            per_run = sum(self.finished) / len(self.finished)
        else:  # first run: assume the others take as long
            per_run = this_run
        return max(this_run - in_run, 0.0) + runs_after * per_run

    def end_epoch(self, epoch, logs):
        logs = logs or {}
        took = time.perf_counter() - self.epoch_start
        self.epoch_seconds.append(took)
        left = format_duration(self.seconds_left())
        self.print(
            f"[{self.run_index}/{self.total_runs}] {self.model_name} seed "
            f"{self.seed}  epoch {epoch + 1}/{self.epochs}  "
            f"loss {logs.get('loss', float('nan')):.3f}  "
            f"acc {logs.get('accuracy', float('nan')):.3f}  {took:.1f}s  "
            f"(study: {left} left)"
        )


class ProgressCallback(keras.callbacks.Callback):
    """Forwards epoch boundaries of `fit()` to a `StudyProgress`.

    Args:
        progress: `StudyProgress`.

    Example:

    ```python
    model.fit(ds, epochs=6, verbose=0, callbacks=[ProgressCallback(progress)])
    ```
    """

    def __init__(self, progress):
        super().__init__()
        self.progress = progress

    def on_epoch_begin(self, epoch, logs=None):
        self.progress.start_epoch()

    def on_epoch_end(self, epoch, logs=None):
        self.progress.end_epoch(epoch, logs)


class ThroughputTimer(keras.callbacks.Callback):
    """Training images per second, excluding compilation.

    With two or more epochs it times epochs 2..n (the first epoch compiles
    the training step); with one epoch it times batches 2..n of it. It never
    touches the model (reading the model would sync JAX state every batch).

    Args:
        images_per_epoch: int. Training images per epoch.
        batches_per_epoch: int. Batches per epoch.

    Example:

    ```python
    timer = ThroughputTimer(images_per_epoch=7936, batches_per_epoch=62)
    model.fit(ds, epochs=6, callbacks=[timer])
    timer.images_per_second()
    ```
    """

    def __init__(self, images_per_epoch, batches_per_epoch):
        super().__init__()
        self.images_per_epoch = int(images_per_epoch)
        self.batches_per_epoch = int(batches_per_epoch)
        self.epoch_seconds = []
        self._first_batch_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._first_batch_end is None:
            self._first_batch_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.epoch_seconds.append(now - self._epoch_start)
        if epoch == 0:
            self._first_epoch_rest = now - self._first_batch_end

    def images_per_second(self):
        """Throughput after compilation, or `None` if not measurable."""
        if len(self.epoch_seconds) >= 2:
            return (
                self.images_per_epoch
                * (len(self.epoch_seconds) - 1)
                / sum(self.epoch_seconds[1:])
            )
        if self.batches_per_epoch >= 2 and self.epoch_seconds:
            images = self.images_per_epoch * (self.batches_per_epoch - 1)
            return images / self.batches_per_epoch / max(self._first_epoch_rest, 1e-9)
        return None
