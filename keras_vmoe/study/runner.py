"""Train and evaluate one model of the study (one router, one seed).

images -> (random flips and shifts) -> VisionMoEImageClassifier -> fit()
       -> test accuracy and routing statistics (one compiled predict)
       -> pre-logits features of digits -> few-shot linear accuracy,
          averaged over `fewshot_draws` draws of the shots
       -> routing sharpness of every MoE layer on a few test images and
          expert-per-patch maps (eager forward)
"""

import contextlib
import time

import keras
import numpy as np

from keras_vmoe.callbacks.routing import moe_layers, tracking_statistics
from keras_vmoe.distribution import validate_layouts
from keras_vmoe.evaluation import (
    fewshot_linear_accuracy,
    model_group_size,
    pad_to_groups,
    predict_in_groups,
)
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier
from keras_vmoe.models.vision_moe.cost import backbone_flops, head_flops
from keras_vmoe.routers import SoftRouting
from keras_vmoe.study import config as study_config
from keras_vmoe.study.augment import augmentation
from keras_vmoe.study.progress import ProgressCallback, ThroughputTimer
from keras_vmoe.study.routing_maps import patch_expert_maps
from keras_vmoe.training.recipe import compile_with_recipe

PRE_LOGITS = "pre_logits"


class RoutingStatisticsAverager(keras.callbacks.Callback):
    """Averages each MoE layer's routing statistics over `predict()` batches.

    The MoE layers keep the statistics of their latest call in variables;
    this reads them after every prediction batch (on JAX, reading
    `self.model` syncs the state first), so the result covers the whole
    predicted set (batches of equal size weigh equally).
    """

    def __init__(self):
        super().__init__()
        self.sums, self.batches = {}, 0

    def on_predict_batch_end(self, batch, logs=None):
        for layer in moe_layers(self.model):
            stats = layer.routing_statistics()
            sums = self.sums.setdefault(layer.path, dict.fromkeys(stats, 0.0))
            for name, value in stats.items():
                sums[name] += value
        self.batches += 1

    def averages(self):
        """`{layer path: {statistic: mean}}`."""
        return {
            layer: {name: total / self.batches for name, total in sums.items()}
            for layer, sums in self.sums.items()
        }


def check_model_layout(model, distribution):
    """Raises unless every weight of `model` is laid out as `distribution` intends.

    For a `keras.distribution.ModelParallel` (its layout map): a weight that
    no key of the map matches (Keras would replicate it silently), or whose
    live array is not sharded as the map says, raises a `ValueError`
    (`keras_vmoe.distribution.validate_layouts`). Other distributions (or
    `None`) lay out nothing per weight and are not checked.

    Args:
        model: a built `keras.Model`.
        distribution: `keras.distribution.Distribution` or None.

    Example (JAX):

    ```python
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh), batch_dim_name="batch")
    with distribution.scope():
        model = build_model(QUICK, "soft", num_classes=10)
    check_model_layout(model, distribution)  # raises if a weight is off
    ```
    """
    # `ModelParallel` keeps its layout map in `_layout_map` (no public getter).
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is not None:
        validate_layouts(model, layout_map)


def build_model(config, model_name, num_classes):
    """The study's classifier for one model name, compiled for training."""
    backbone = VisionMoEBackbone(**study_config.backbone_config(config, model_name))
    return VisionMoEImageClassifier(
        backbone,
        num_classes=num_classes,
        representation_size=config.representation_size,
        loss_type="softmax",
    )


def _compile(model, config, total_steps):
    """The V-MoE recipe (`compile_with_recipe`) with the study's settings.

    Adam (0.9, 0.999, global norm clipping 1.0) with decoupled weight decay
    `config.weight_decay` on every kernel; linear warmup over
    `study_config.warmup_steps` steps to `config.learning_rate`, then
    linear decay to 1e-5; softmax cross-entropy and top-1 accuracy. Each
    update averages the gradients of `config.accumulation_steps` passes
    (`total_steps` counts updates).
    """
    compile_with_recipe(
        model,
        "vmoe",
        total_steps=total_steps,
        peak_learning_rate=config.learning_rate,
        warmup_steps=study_config.warmup_steps(config, total_steps),
        weight_decay=config.weight_decay,
        loss="softmax",
        gradient_accumulation_steps=config.accumulation_steps,
        jit_compile=config.jit_compile,
    )


def _train_dataset(x, y, batch_size, seed, augment=None, passes=1):
    """Reshuffled every epoch, whole batches only, optionally augmented.

    keras-hub tasks turn NumPy inputs of `fit()` into an unshuffled
    `tf.data` pipeline (they ignore `shuffle=True`), so the study shuffles
    here. Dropping the last partial batch (a different one every epoch)
    avoids compiling a second training step for a smaller batch.
    `augment` (a Keras layer) transforms each batch in the pipeline, one
    batch at a time: its random draws then come in batch order, so a seed
    gives the same augmented images in every run and for every model (a
    parallel map draws in thread order: measured, two pipelines of one
    seed differed). It costs about 0.4 CPU seconds per epoch of the
    default study, beside 5 to 7 of training.
    `passes > 1` then splits each batch into that many equal consecutive
    parts (one forward and backward pass each, their gradients accumulated
    into one update): the same images, in the same order and with the
    same augmentation, as without the split.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if augment is not None:
        ds = ds.map(lambda images, labels: (augment(images, training=True), labels))
    if passes > 1:
        ds = ds.rebatch(batch_size // passes, drop_remainder=True)
        # `rebatch` leaves the length unknown; Keras reads it from here.
        steps = len(x) // batch_size * passes
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(2)


def _predict(model, x, batch_size, group_size, callbacks=None):
    """Outputs on `x`, run as whole routing groups (`predict_in_groups`)."""
    return predict_in_groups(
        model, x, batch_size, group_size=group_size, callbacks=callbacks
    )


def routing_sharpness(routings):
    """How sharply a routing picks tokens, per MoE layer, for the report.

    Soft MoE: per slot, the entropy `H` of its dispatch weights over the
    group's `S` tokens; `tokens_per_slot = exp(H)` (averaged over slots and
    groups) is how many tokens a slot effectively averages (`S` when
    uniform, 1 when it takes a single token), `dispatch_entropy_ratio =
    H / log(S)` (1 when uniform) and `max_dispatch_weight` the mean over
    slots of the largest weight (`1/S` when uniform). Sparse routers:
    `tokens_per_slot` is 1 by construction; their sharpness is in
    `fraction_tokens_dropped` and `load_imbalance`, so they get none here.

    Args:
        routings: dict `{layer path: Routing}`.

    Returns:
        dict `{layer path: {statistic: float}}` (empty for sparse routers).

    Example (one group of 2 tokens, 2 slots: uniform, and all on token 0):
    >>> import numpy as np
    >>> w = np.array([[[[0.5], [1.0]], [[0.5], [0.0]]]], "float32")
    >>> s = routing_sharpness({"moe": SoftRouting(w, w)})["moe"]
    >>> round(s["tokens_per_slot"], 4), round(s["max_dispatch_weight"], 4)
    (1.5, 0.75)
    """
    from keras import ops

    result = {}
    for path, routing in routings.items():
        if not isinstance(routing, SoftRouting):
            continue
        w = ops.convert_to_numpy(routing.dispatch_tensor()).astype(np.float64)
        g, s, e, p = w.shape  # (G, S, E, P): weights over S per slot
        w = np.moveaxis(w, 1, -1).reshape(-1, s)  # (G * E * P, S)
        entropy = -np.sum(np.where(w > 0, w * np.log(np.maximum(w, 1e-30)), 0.0), -1)
        result[path] = {
            "tokens_per_slot": float(np.mean(np.exp(entropy))),
            "dispatch_entropy_ratio": float(np.mean(entropy) / np.log(s)),
            "max_dispatch_weight": float(np.mean(w.max(axis=-1))),
            "tokens_per_group": int(s),
        }
    return result


def capture_routings(model, images):
    """`{layer path: Routing}` of every MoE layer on `images` (eager pass)."""
    layers = moe_layers(model)
    with contextlib.ExitStack() as stack:
        captured = {
            layer.path: stack.enter_context(layer.capture_routing()) for layer in layers
        }
        if layers:
            model(images, training=False)
    return {path: routings[-1] for path, routings in captured.items() if routings}


def fewshot_over_draws(f_train, y_train, f_test, y_test, config, seed):
    """Few-shot accuracy `{shot: mean over draws}` for one model and seed.

    Draw `i` of seed `s` picks its shots with seed `1000 * s + i`, so two
    models trained with the same seed are probed on the same shots.
    """
    totals = dict.fromkeys(config.shots, 0.0)
    for draw in range(config.fewshot_draws):
        result = fewshot_linear_accuracy(
            f_train,
            y_train,
            f_test,
            y_test,
            shots=config.shots,
            l2_regs=(config.fewshot_l2,),
            seed=1000 * seed + draw,
        )
        for shot, by_l2 in result.items():
            totals[int(shot)] += float(next(iter(by_l2.values())))
    return {shot: total / config.fewshot_draws for shot, total in totals.items()}


def _mean_over_layers(stats, name):
    if not stats:
        return None
    return float(np.mean([layer[name] for layer in stats.values()]))


def train_and_evaluate(
    config,
    model_name,
    seed,
    data,
    progress=None,
    routing_maps=True,
    distribution=None,
):
    """Trains one model of the study and evaluates it.

    Args:
        config: `StudyConfig`.
        model_name: str. `"dense"` or a router name.
        seed: int. Seeds the weights, the data order, the augmentation,
            the router noise and the few-shot draws.
        data: `StudyData`.
        progress: `StudyProgress` or None. Receives the epoch ends.
        routing_maps: bool. Record the expert-per-patch maps (an eager
            forward pass, several seconds for a sparse router on a CPU).
            Soft MoE runs the pass anyway, for its dispatch sharpness.
            Defaults to `True`.
        distribution: `keras.distribution.Distribution` or None. The model
            is built, trained and evaluated in its `scope()` (JAX), e.g. a
            `ModelParallel` on a `(batch, expert)` device mesh whose layout
            map shards the experts; its layout is checked on the live
            weights before training (`check_model_layout`). The training
            and evaluation batches should split into whole routing groups
            per batch shard. Defaults to `None` (the current distribution,
            usually none: one device).

    Returns:
        dict: `model`, `seed`, `test_accuracy`, `fewshot` (`{shot: acc}`),
        `images_per_second`, `gflops_per_image`, `params`,
        `fraction_tokens_dropped` and `load_imbalance` (mean over MoE layers
        on the test set; `None` for the dense model), `slots_per_group`
        (`E * C` of the last MoE layer's routing at evaluation, or the
        plan's without a routing pass; `None` for the dense model),
        `images_per_group` (of the routing),
        `tokens_per_slot` and `max_dispatch_weight` (Soft MoE's routing
        sharpness, mean over MoE layers; `None` for the others),
        `routing_statistics` and `routing_sharpness` (per layer), `history`
        (`loss`, `accuracy` per epoch),
        `train_seconds`, `seconds`, and `expert_maps` (int array
        `(N, grid, grid)` or `None`; not JSON).

    Example:

    ```python
    result = train_and_evaluate(QUICK, "soft", seed=0, data=load_study_data(QUICK))
    print(result["test_accuracy"], result["fewshot"][10])
    ```
    """
    if distribution is None:
        return _train_and_evaluate(
            config, model_name, seed, data, progress, routing_maps
        )
    with distribution.scope():
        return _train_and_evaluate(
            config, model_name, seed, data, progress, routing_maps, distribution
        )


def _train_and_evaluate(
    config, model_name, seed, data, progress, routing_maps, distribution=None
):
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = build_model(config, model_name, data.num_classes)
    check_model_layout(model, distribution)
    steps_per_epoch = len(data.x_train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {len(data.x_train)} "
            "training images."
        )
    used = steps_per_epoch * config.batch_size
    _compile(model, config, total_steps=steps_per_epoch * config.epochs)
    passes = config.accumulation_steps
    timer = ThroughputTimer(used, steps_per_epoch * passes)
    callbacks = [timer] + ([ProgressCallback(progress)] if progress else [])
    augment = None
    if config.augment:
        augment = augmentation(config.image_size, config.max_shift, seed)
    history = model.fit(
        _train_dataset(
            data.x_train, data.y_train, config.batch_size, seed, augment, passes
        ),
        epochs=config.epochs,
        shuffle=False,  # the dataset reshuffles itself
        verbose=0,
        callbacks=callbacks,
    )
    train_seconds = time.perf_counter() - start

    # One predict model (logits and features) serves every evaluation, and
    # one compiled predict step: the MoE layers track their statistics in
    # all three passes (entering and leaving the block retraces the step),
    # the averager reads them on the test images only.
    evaluator = keras.Model(
        model.input, [model.output, model.get_layer(PRE_LOGITS).output]
    )
    averager = RoutingStatisticsAverager()
    group = model_group_size(model)  # `evaluator` has no backbone attribute
    fs = data.fewshot
    with tracking_statistics(evaluator):  # inference skips statistics by default
        logits, _ = _predict(
            evaluator, data.x_test, config.eval_batch_size, group, [averager]
        )
        _, f_train = _predict(evaluator, fs["x_train"], config.eval_batch_size, group)
        _, f_test = _predict(evaluator, fs["x_test"], config.eval_batch_size, group)
    test_accuracy = float(np.mean(logits.argmax(axis=-1) == data.y_test))
    stats = averager.averages() if moe_layers(model) else {}
    fewshot = fewshot_over_draws(
        f_train, fs["y_train"], f_test, fs["y_test"], config, seed
    )
    # One eager pass records every MoE layer's routing: of the map images
    # (their expert per patch), and for Soft MoE of `diagnostic_images`
    # (how sharp its dispatch is; sparse routers report dropped tokens and
    # load instead, from the compiled test pass).
    n_maps = -(-config.routing_images // group) * group if routing_maps else 0
    n_pass = n_maps
    if model_name == study_config.SOFT:
        n_pass = max(n_maps, -(-config.diagnostic_images // group) * group)
    routings = {}
    if n_pass:
        images = pad_to_groups(data.x_test[:n_pass], group)
        routings = capture_routings(model, images)
    sharpness = routing_sharpness(routings)
    map_images = data.x_test[:n_maps]  # whole groups (padded if the set is short)
    maps = slots = None
    if model_name != study_config.DENSE:
        plan = study_config.equal_compute(config)
        per_expert = plan["router_configs"][model_name].get("num_slots")
        per_expert = per_expert or plan["slots_per_expert"]
        slots = config.num_experts * per_expert  # the plan's E * C
    if routings:
        routing = list(routings.values())[-1]  # the last MoE layer
        grid = config.image_size // config.patch_size
        maps = patch_expert_maps(
            routing, config.tokens_per_image, grid, config.use_class_token
        )
        maps = maps[: len(map_images)] if routing_maps else None
        slots = routing.num_experts * routing.capacity  # E * C actually run
    bb_config = study_config.backbone_config(config, model_name)
    flops = backbone_flops(bb_config) + head_flops(
        config.hidden_dim, data.num_classes, config.representation_size
    )
    return {
        "model": model_name,
        "seed": int(seed),
        "test_accuracy": test_accuracy,
        "fewshot": fewshot,
        "images_per_second": timer.images_per_second(),
        "gflops_per_image": flops / 1e9,
        "params": int(model.count_params()),
        "fraction_tokens_dropped": _mean_over_layers(stats, "fraction_tokens_dropped"),
        "load_imbalance": _mean_over_layers(stats, "load_imbalance"),
        "slots_per_group": slots,
        "images_per_group": group,
        "tokens_per_slot": _mean_over_layers(sharpness, "tokens_per_slot"),
        "max_dispatch_weight": _mean_over_layers(sharpness, "max_dispatch_weight"),
        "routing_statistics": stats,
        "routing_sharpness": sharpness,
        "history": {
            key: [float(v) for v in history.history[key]]
            for key in ("loss", "accuracy")
        },
        "train_images_per_epoch": int(used),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "expert_maps": maps,
    }
