"""Tiny configurations shared by the model tests."""

TINY = dict(
    image_shape=(16, 16, 3),
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
)

# Router settings that keep tiny models valid (capacities >= 1, few slots).
TINY_ROUTER_CONFIGS = {
    "softmax_token_choice": {"num_selected_experts": 2, "capacity_factor": 1.0},
    "sinkhorn_token_choice": {"num_selected_experts": 2, "capacity_factor": 1.0},
    "softmax_expert_choice": {"capacity_factor": 2.0},
    "sinkhorn_expert_choice": {"capacity_factor": 2.0},
    "sparsity_constrained_expert_choice": {"capacity_factor": 2.0},
    "soft": {"num_slots": 2},
}


def tiny_moe(router, **overrides):
    """Backbone kwargs of a tiny V-MoE with `router` in block 1."""
    config = dict(
        TINY,
        router=router,
        router_config=dict(TINY_ROUTER_CONFIGS.get(router, {})),
        num_experts=4,
        group_size=2,
        moe_layers=[1],
    )
    config.update(overrides)
    return config
