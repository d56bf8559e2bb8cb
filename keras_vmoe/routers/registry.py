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
    return get_class(identifier)(**kwargs)
