"""Tiny configurations shared by the model tests."""

from keras_vmoe.routers import ComputeBudget, get_class

TINY = dict(
    image_shape=(16, 16, 3),
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
)

# Every router at equal compute from its own contract: groups of 2 images of
# 17 tokens (S = 34), E = 4, C = ceil(34 * 2 / 4) = 17 slots per expert (E * C
# = 68 slots per group, what Token Choice with K = 2 fills when nothing is
# dropped). A router registered later gets its settings the same way.
TINY_BUDGET = ComputeBudget.from_capacity_factor(34, 4, 2, 1.0)


def tiny_router_config(router):
    """The `router_config` of `router` at `TINY_BUDGET` ({} for None)."""
    if router is None:
        return {}
    return get_class(router).equal_compute_config(TINY_BUDGET)


def tiny_moe(router, **overrides):
    """Backbone kwargs of a tiny V-MoE with `router` in block 1."""
    config = dict(
        TINY,
        router=router,
        router_config=tiny_router_config(router),
        num_experts=4,
        group_size=2,
        moe_layers=[1],
    )
    config.update(overrides)
    return config
