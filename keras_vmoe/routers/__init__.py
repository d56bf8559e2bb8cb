"""Routers: the router contract, allocation functions, losses, the six routers.

Every router subclasses `Router` and registers itself with
`@register_router("name")` in its own file (docs/architecture.md, "Adding a
router").
"""

from keras_vmoe.routers.allocation import expert_choice, token_choice
from keras_vmoe.routers.base import ComputeBudget, PresetRecipe, Router
from keras_vmoe.routers.capacity import compute_capacity
from keras_vmoe.routers.losses import (
    gshard_loss,
    importance_loss,
    load_loss,
    router_z_loss,
)
from keras_vmoe.routers.registry import (
    ROUTER_NAMES,
    get,
    get_class,
    register_router,
    router_names,
    unregister_router,
)
from keras_vmoe.routers.routing import Routing, SoftRouting, SparseRouting
from keras_vmoe.routers.sparse_router import (
    DenseGatingRouter,
    SparseRouter,
    TokenChoiceRouter,
)

# The six routers, in the paper's order; each registers itself on import,
# so this order is the order of `ROUTER_NAMES`.
# isort: off
from keras_vmoe.routers.softmax_token_choice import SoftmaxTokenChoiceRouter
from keras_vmoe.routers.sinkhorn_token_choice import SinkhornTokenChoiceRouter
from keras_vmoe.routers.softmax_expert_choice import SoftmaxExpertChoiceRouter
from keras_vmoe.routers.sinkhorn_expert_choice import SinkhornExpertChoiceRouter
from keras_vmoe.routers.sparsity_constrained_expert_choice import (
    SparsityConstrainedExpertChoiceRouter,
)
from keras_vmoe.routers.soft import SoftRouter
# isort: on

__all__ = [
    "ComputeBudget",
    "DenseGatingRouter",
    "PresetRecipe",
    "ROUTER_NAMES",
    "Router",
    "Routing",
    "SinkhornExpertChoiceRouter",
    "SinkhornTokenChoiceRouter",
    "SoftRouter",
    "SoftRouting",
    "SoftmaxExpertChoiceRouter",
    "SoftmaxTokenChoiceRouter",
    "SparseRouter",
    "SparseRouting",
    "SparsityConstrainedExpertChoiceRouter",
    "TokenChoiceRouter",
    "compute_capacity",
    "expert_choice",
    "get",
    "get_class",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "register_router",
    "router_names",
    "router_z_loss",
    "token_choice",
    "unregister_router",
]
