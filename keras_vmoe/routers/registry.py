"""Routers by name: the `@register_router` decorator and lookups.

Each router's own file registers its class with `@register_router("name")`;
models, presets, the cost model and the study find routers here by name.
"""

import collections.abc
import difflib
import inspect

import keras

from keras_vmoe.routers.base import Router

# name -> router class, in registration order.
_REGISTRY = {}


class _RegisteredNames(collections.abc.Sequence):
    """The registered router names, read-only and always up to date."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self):
        return len(_REGISTRY)

    def __eq__(self, other):
        return isinstance(other, collections.abc.Sequence) and tuple(self) == tuple(
            other
        )

    def __hash__(self):
        return hash(tuple(self))

    def __repr__(self):
        return repr(tuple(self))


# The names of every registered router, including routers registered after
# import (e.g. in user code): `"soft" in ROUTER_NAMES`, `list(ROUTER_NAMES)`.
ROUTER_NAMES = _RegisteredNames()


def router_names():
    """The registered router names, as a tuple."""
    return tuple(_REGISTRY)


def register_router(name, package="keras_vmoe"):
    """Class decorator: registers a `Router` subclass under `name`.

    The class becomes available to `get`, `get_class`, the backbone's
    `router=` argument, presets, the cost model and the study, and is
    registered for Keras serialization (as `package>ClassName`).

    Args:
        name: str. The router's name, e.g. `"softmax_expert_choice"`.
        package: str. Keras serialization package. Defaults to
            `"keras_vmoe"`.

    Example:
    >>> from keras_vmoe.routers import SoftmaxExpertChoiceRouter
    >>> @register_router("my_expert_choice", package="my_project")
    ... class MyExpertChoiceRouter(SoftmaxExpertChoiceRouter):
    ...     label = "My Expert Choice"
    >>> get_class("my_expert_choice") is MyExpertChoiceRouter
    True
    >>> unregister_router("my_expert_choice")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"A router name must be a Python identifier string, got {name!r}."
        )

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(
                f"@register_router({name!r}) decorates subclasses of "
                f"keras_vmoe.routers.Router, got {cls!r}."
            )
        known = _REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"Router name {name!r} is already registered for "
                f"{known.__module__}.{known.__qualname__}."
            )
        cls.router_name = name
        cls = keras.saving.register_keras_serializable(package=package)(cls)
        _REGISTRY[name] = cls
        return cls

    return decorator


def unregister_router(name):
    """Removes the router registered under `name` (e.g. at a test's end)."""
    get_class(name)
    del _REGISTRY[name]


def get_class(identifier):
    """The router class registered under `identifier` (see `ROUTER_NAMES`)."""
    if identifier not in _REGISTRY:
        close = difflib.get_close_matches(str(identifier), router_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown router {identifier!r}.{hint} Known routers: "
            f"{', '.join(router_names())}."
        )
    return _REGISTRY[identifier]


def router_arguments(identifier):
    """The keyword arguments the router `identifier` accepts, sorted.

    Collected from the constructors of the router class and its bases,
    `keras.layers.Layer` included (`dtype`, `name`, `trainable`, ...).

    Example:
    >>> "num_slots" in router_arguments("soft")
    True
    """
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
