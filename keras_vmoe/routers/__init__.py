"""Routers: affinities, allocation functions, auxiliary losses, router layers."""

from keras_vmoe.routers.allocation import expert_choice, token_choice
from keras_vmoe.routers.base import DenseGatingRouter, Router
from keras_vmoe.routers.capacity import compute_capacity
from keras_vmoe.routers.losses import (
    gshard_loss,
    importance_loss,
    load_loss,
    router_z_loss,
)
from keras_vmoe.routers.registry import ROUTER_NAMES, get
from keras_vmoe.routers.routing import Routing
from keras_vmoe.routers.sinkhorn_expert_choice import SinkhornExpertChoiceRouter
from keras_vmoe.routers.sinkhorn_token_choice import SinkhornTokenChoiceRouter
from keras_vmoe.routers.soft import SoftRouter
from keras_vmoe.routers.softmax_expert_choice import SoftmaxExpertChoiceRouter
from keras_vmoe.routers.softmax_token_choice import SoftmaxTokenChoiceRouter
from keras_vmoe.routers.sparsity_constrained_expert_choice import (
    SparsityConstrainedExpertChoiceRouter,
)

__all__ = [
    "DenseGatingRouter",
    "ROUTER_NAMES",
    "Router",
    "Routing",
    "SinkhornExpertChoiceRouter",
    "SinkhornTokenChoiceRouter",
    "SoftRouter",
    "SoftmaxExpertChoiceRouter",
    "SoftmaxTokenChoiceRouter",
    "SparsityConstrainedExpertChoiceRouter",
    "compute_capacity",
    "expert_choice",
    "get",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "router_z_loss",
    "token_choice",
]
