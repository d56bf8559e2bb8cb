"""Sharding V-MoE models with `keras.distribution` (JAX).

`get_layout_map` gives the `keras.distribution.LayoutMap` of a V-MoE: the
stacked expert weights are sharded on an expert mesh axis (expert
parallelism), attention and dense MLP kernels optionally on a model axis
(Megatron-style tensor parallelism), and everything else is replicated
explicitly. Use it with `keras.distribution.ModelParallel`; the MoE layers
then also constrain their dispatched tokens `(E, G, C, d)` to the expert
axis, so XLA moves tokens to the experts' devices with an all-to-all.

Keras replicates, without a word, every weight that no key of the layout
map matches. Every key here matches only the weight names the V-MoE models
create, so `check_layouts` (or `validate_layouts`, which raises) can tell a
weight that is replicated on purpose from one that no key matched.

`keras.distribution` shards on the JAX backend only. With TensorFlow use a
`tf.distribute` strategy (data parallel); torch runs on one device.
"""

import collections

import keras

from keras_vmoe.layers.moe import STATISTICS
from keras_vmoe.routers import get_class, router_names

# Paths are matched with `re.fullmatch`; the prefix lets a model be nested.
_PREFIX = r"(?:.*/)?"
_BLOCK = _PREFIX + r"encoder_block_\d+/"

# Every key matches weight names only, never a layer's `<path>/output`
# (which Keras also looks up, to relayout layer outputs).
_REPLICATED = (
    _PREFIX + r"patch_embedding/conv/(?:kernel|bias)",
    _PREFIX + r"class_token/token",
    _PREFIX + r"position_embedding/embeddings",
    _PREFIX + r"(?:encoder_block_\d+/ln_[12]|encoder_norm)/(?:gamma|beta)",
    _BLOCK + r"attention/attention_output/bias",
    _BLOCK + r"attention/(?:query|key)_norm/gamma",
    _BLOCK + r"mlp/dense_2/bias",
    _PREFIX + r"moe/(?:" + "|".join(STATISTICS) + ")",
    _PREFIX + r"(?:head|pre_logits)/(?:kernel|bias)",
    _PREFIX + r"seed_generator(?:_\d+)?/seed_generator_state",
)

# The stacked weights of `MlpExperts` and their ranks: (E, d, h), (E, h),
# (E, h, d), (E, d). Sharded on the expert axis (dimension 0).
EXPERT_WEIGHTS = {
    "intermediate_kernel": 3,
    "intermediate_bias": 2,
    "output_kernel": 3,
    "output_bias": 2,
}


def _router_weights_key():
    """Matches the weights of every registered router (each declares its
    `weight_names`), so a router registered later is covered too."""
    names = sorted(
        {name for router in router_names() for name in get_class(router).weight_names}
    )
    return _PREFIX + r"moe/router/(?:" + "|".join(names) + ")"


LayoutProblem = collections.namedtuple("LayoutProblem", ["variable", "path", "reason"])


def _check_axis(device_mesh, name, axis, allow_none=True):
    if axis is None and allow_none:
        return
    if axis not in device_mesh.axis_names:
        raise ValueError(
            f"`{name}={axis!r}` is not an axis of the device mesh; its axes "
            f"are {tuple(device_mesh.axis_names)}."
        )


def get_layout_map(
    device_mesh, data_axis="batch", expert_axis="expert", model_axis=None
):
    """The `keras.distribution.LayoutMap` of a V-MoE backbone or classifier.

    - The stacked expert weights of every MoE layer
      (`.../experts/intermediate_kernel (E, d, h)`, `intermediate_bias
      (E, h)`, `output_kernel (E, h, d)`, `output_bias (E, d)`) are sharded
      on `expert_axis` (dimension 0): each device holds `E / mesh[expert]`
      experts, and their optimizer slots follow.
    - With `model_axis`, attention and dense MLP kernels are sharded
      Megatron-style: query/key/value kernels `(d, heads, head_dim)` and
      their biases on the heads, the attention output kernel on its heads
      (row-parallel), the first dense `(d, mlp_dim)` column-sharded (and its
      bias), the second `(mlp_dim, d)` row-sharded.
    - Every other weight of the models (embeddings, layer norms, routers,
      MoE statistics, head, the remaining biases, seed generators) has an
      explicit replicated key, so that `check_layouts` can report a weight
      that no key matches (Keras would replicate it without a word).

    The data is sharded on `data_axis` by the distribution
    (`ModelParallel(layout_map=..., batch_dim_name=data_axis)`); the MoE
    layers shard their dispatched tokens on the mesh axis named by their
    `expert_axis` argument, `"expert"` in `VisionMoEBackbone`: name the mesh
    axis `"expert"` (with another name the weights are still sharded, but
    the MoE layers do not constrain their tokens). On a mesh
    `(batch, expert)`, each device holds a slice of the batch (replicated
    along `expert`) and `E / mesh["expert"]` experts. `data_axis` may also
    equal `expert_axis` (a 1-D mesh named `"expert"`, as in V-MoE): every
    device then holds both a slice of the batch and a slice of the experts.

    Args:
        device_mesh: `keras.distribution.DeviceMesh`. Must have the axes named
            below.
        data_axis: str. The mesh axis the batch is sharded on (checked to
            exist; pass the same name as `batch_dim_name`). Defaults to
            `"batch"`.
        expert_axis: str or None. The mesh axis the experts are sharded on;
            its size must divide the number of experts. `None` replicates
            the experts. Defaults to `"expert"`.
        model_axis: str or None. The mesh axis for tensor parallelism of
            attention and dense MLPs; its size must divide `num_heads` and
            `mlp_dim`. Defaults to `None` (replicated).

    Returns:
        A `keras.distribution.LayoutMap` on `device_mesh`.

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     shape=(1, 1), axis_names=("batch", "expert"), devices=["cpu:0"])
    >>> layout_map = get_layout_map(mesh)
    >>> layout_map["encoder_block_1/moe/experts/intermediate_kernel"].axes
    ('expert', None, None)
    >>> layout_map["encoder_block_0/mlp/dense_1/kernel"].axes  # no model axis
    (None, None)

    Then, on JAX:

        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch")
        with distribution.scope():
            model = VisionMoEImageClassifier(...)
        validate_layouts(model, layout_map)
    """
    _check_axis(device_mesh, "data_axis", data_axis)
    _check_axis(device_mesh, "expert_axis", expert_axis)
    _check_axis(device_mesh, "model_axis", model_axis)
    if model_axis is not None and model_axis in (data_axis, expert_axis):
        raise ValueError(
            f"`model_axis={model_axis!r}` must differ from `data_axis` and "
            "`expert_axis`."
        )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for key in _REPLICATED + (_router_weights_key(),):
        layout_map[key] = ()

    for name, rank in EXPERT_WEIGHTS.items():
        layout_map[_PREFIX + "experts/" + name] = (expert_axis,) + (None,) * (rank - 1)

    m = model_axis
    layout_map[_BLOCK + r"attention/(?:query|key|value)/kernel"] = (None, m, None)
    layout_map[_BLOCK + r"attention/(?:query|key|value)/bias"] = (m, None)
    layout_map[_BLOCK + r"attention/attention_output/kernel"] = (m, None, None)
    layout_map[_BLOCK + r"mlp/dense_1/kernel"] = (None, m)
    layout_map[_BLOCK + r"mlp/dense_1/bias"] = (m,)
    layout_map[_BLOCK + r"mlp/dense_2/kernel"] = (m, None)
    return layout_map


def layout_problems(model, layout_map, variables=None, check_values=True):
    """Each variable whose layout is not the one `layout_map` intends, and why.

    A variable is reported when no key of the map matches its path (Keras
    would replicate it silently), when several keys match (Keras raises),
    when the layout has more axes than the variable, when a sharded
    dimension is not divisible by the mesh axis size, or (JAX, with
    `check_values`) when the variable's actual sharding differs from the
    intended one (e.g. it was created outside the distribution's scope).

    Args:
        model: a Keras model or layer (built).
        layout_map: `keras.distribution.LayoutMap`, e.g. from
            `get_layout_map`.
        variables: list of variables to check. Defaults to `model.weights`.
        check_values: bool. Compare the actual sharding of the values (JAX
            only). `False` checks the map against the shapes only, e.g. for
            a model built without a distribution. Defaults to `True`.

    Returns:
        A list of `LayoutProblem(variable, path, reason)`, empty when every
        variable has its intended layout.

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     shape=(1, 1), axis_names=("batch", "expert"), devices=["cpu:0"])
    >>> layer = keras.layers.Dense(2, name="extra")
    >>> layer.build((None, 3))
    >>> [p.path for p in layout_problems(layer, get_layout_map(mesh))]
    ['extra/kernel', 'extra/bias']
    """
    mesh = layout_map.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    check_values = check_values and keras.backend.backend() == "jax"
    if variables is None:
        variables = model.weights
    problems = []
    for variable in variables:
        path = variable.path
        try:
            layout = layout_map[path]
        except ValueError as error:  # several keys match
            problems.append(LayoutProblem(variable, path, str(error)))
            continue
        if layout is None:
            problems.append(
                LayoutProblem(
                    variable,
                    path,
                    "no key of the layout map matches it, so Keras would "
                    "replicate it silently",
                )
            )
            continue
        shape = tuple(variable.shape)
        axes = tuple(layout.axes)
        if len(axes) > len(shape):
            problems.append(
                LayoutProblem(
                    variable,
                    path,
                    f"layout {axes} has more axes than its shape {shape}",
                )
            )
            continue
        axes = axes + (None,) * (len(shape) - len(axes))
        bad = [
            f"dimension {i} ({dim}) is not divisible by mesh axis "
            f"{axis!r} of size {sizes[axis]}"
            for i, (dim, axis) in enumerate(zip(shape, axes))
            if axis is not None and dim % sizes[axis]
        ]
        if bad:
            problems.append(LayoutProblem(variable, path, "; ".join(bad)))
            continue
        if check_values:
            value = variable.value
            sharding = getattr(value, "sharding", None)
            if sharding is None or not sharding.is_equivalent_to(
                layout.backend_layout, len(shape)
            ):
                actual = getattr(sharding, "spec", sharding)
                problems.append(
                    LayoutProblem(
                        variable,
                        path,
                        f"intended sharding {axes}, actual {actual}",
                    )
                )
    return problems


def check_layouts(model, layout_map, variables=None, check_values=True):
    """The variables whose layout is not the one `layout_map` intends.

    See `layout_problems` for what is checked; this returns the variables
    only. An empty list means every checked variable is laid out as
    intended; in particular no MoE weight was silently replicated.

    Args:
        model: a Keras model or layer (built).
        layout_map: `keras.distribution.LayoutMap`, e.g. from
            `get_layout_map`.
        variables: list of variables to check. Defaults to `model.weights`.
        check_values: bool. Compare the actual sharding of the values (JAX
            only). Defaults to `True`.

    Returns:
        list of `keras.Variable`.

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     shape=(1, 1), axis_names=("batch", "expert"), devices=["cpu:0"])
    >>> norm = keras.layers.LayerNormalization(name="encoder_norm")
    >>> norm.build((None, 4))
    >>> check_layouts(norm, get_layout_map(mesh), check_values=False)
    []
    """
    return [
        problem.variable
        for problem in layout_problems(model, layout_map, variables, check_values)
    ]


def validate_layouts(model, layout_map, variables=None, check_values=True):
    """Raises a `ValueError` listing every variable not laid out as intended.

    Call it after building a model under
    `ModelParallel(layout_map=layout_map, ...)`, before training: it catches
    a weight (e.g. of a new layer) that no key matches and that Keras would
    otherwise replicate on every device without a word.

    Args:
        model: a Keras model or layer (built).
        layout_map: `keras.distribution.LayoutMap`, e.g. from
            `get_layout_map`.
        variables: list of variables to check. Defaults to `model.weights`.
        check_values: bool. Compare the actual sharding of the values (JAX
            only). Defaults to `True`.

    Raises:
        ValueError: naming each variable with the reason.

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     shape=(1, 1), axis_names=("batch", "expert"), devices=["cpu:0"])
    >>> layer = keras.layers.Dense(2, use_bias=False, name="extra")
    >>> layer.build((None, 3))
    >>> validate_layouts(layer, get_layout_map(mesh))
    Traceback (most recent call last):
    ...
    ValueError: 1 variable(s) are not laid out as the layout map intends:
      extra/kernel: no key of the layout map matches it, so Keras would replicate it silently
    Add a key for each to the layout map (replicate with `layout_map[key] = ()`).
    """
    problems = layout_problems(model, layout_map, variables, check_values)
    if problems:
        lines = "\n".join(f"  {p.path}: {p.reason}" for p in problems)
        raise ValueError(
            f"{len(problems)} variable(s) are not laid out as the layout map "
            f"intends:\n{lines}\nAdd a key for each to the layout map "
            "(replicate with `layout_map[key] = ()`)."
        )


__all__ = [
    "EXPERT_WEIGHTS",
    "LayoutProblem",
    "check_layouts",
    "get_layout_map",
    "layout_problems",
    "validate_layouts",
]
