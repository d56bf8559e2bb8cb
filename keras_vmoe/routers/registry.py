"""Router lookup by name, for models and configs."""

import difflib
import importlib

# name -> (module, class). Modules are imported on first use.
_ROUTERS = {
    "softmax_token_choice": ("softmax_token_choice", "SoftmaxTokenChoiceRouter"),
    "sinkhorn_token_choice": ("sinkhorn_token_choice", "SinkhornTokenChoiceRouter"),
    "softmax_expert_choice": ("softmax_expert_choice", "SoftmaxExpertChoiceRouter"),
    "sinkhorn_expert_choice": ("sinkhorn_expert_choice", "SinkhornExpertChoiceRouter"),
    "sparsity_constrained_expert_choice": (
        "sparsity_constrained_expert_choice",
        "SparsityConstrainedExpertChoiceRouter",
    ),
    "soft": ("soft", "SoftRouter"),
}

ROUTER_NAMES = tuple(_ROUTERS)


def get_class(identifier):
    """The router class registered under `identifier` (see `ROUTER_NAMES`)."""
    if identifier not in _ROUTERS:
        close = difflib.get_close_matches(str(identifier), ROUTER_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown router {identifier!r}.{hint} Known routers: "
            f"{', '.join(ROUTER_NAMES)}."
        )
    module, cls = _ROUTERS[identifier]
    return getattr(importlib.import_module(f"keras_vmoe.routers.{module}"), cls)


def router_arguments(identifier):
    """The keyword arguments the router `identifier` accepts, sorted.

    Collected from the constructors of the router class and its bases,
    `keras.layers.Layer` included (`dtype`, `name`, `trainable`, ...).

    Example:
    >>> "num_slots" in router_arguments("soft")
    True
    """
    import inspect

    import keras

    names = set()
    for cls in get_class(identifier).__mro__:
        if not issubclass(cls, keras.layers.Layer):
            break
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and param.kind not in (
                param.VAR_POSITIONAL,
                param.VAR_KEYWORD,
            ):
                names.add(name)
        if cls is keras.layers.Layer:
            break
    return tuple(sorted(names))


def check_router_arguments(identifier, kwargs, argument="router_config", reserved=()):
    """Raises a ValueError naming `argument` if a key of `kwargs` is unknown.

    Args:
        identifier: str. A router name (`ROUTER_NAMES`).
        kwargs: dict. Keyword arguments meant for the router.
        argument: str. What to call `kwargs` in the message. Defaults to
            `"router_config"`.
        reserved: sequence of str. Router arguments the caller sets itself,
            refused in `kwargs`. Defaults to `()`.
    """
    accepted = [a for a in router_arguments(identifier) if a not in reserved]
    taken = sorted(set(kwargs) & set(reserved))
    if taken:
        raise ValueError(
            f"`{argument}` must not set {taken}: they are set for you "
            f"(e.g. `num_experts=` of the backbone)."
        )
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ValueError(
            f"`{argument}` has unknown argument(s) {unknown} for router "
            f"{identifier!r}.{hint} Accepted: {', '.join(accepted)}."
        )


def get(identifier, **kwargs):
    """A new router layer by registry name.

    Args:
        identifier: str. One of `ROUTER_NAMES`: "softmax_token_choice",
            "sinkhorn_token_choice", "softmax_expert_choice",
            "sinkhorn_expert_choice", "sparsity_constrained_expert_choice",
            "soft".
        **kwargs: the router's constructor arguments (`num_experts`, ...,
            and layer arguments such as `name`).

    Example:
    >>> router = get("softmax_expert_choice", num_experts=8)
    >>> type(router).__name__
    'SoftmaxExpertChoiceRouter'
    """
    check_router_arguments(identifier, kwargs, argument="**kwargs")
    return get_class(identifier)(**kwargs)
