import pytest

from keras_vmoe.routers import compute_capacity


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # 16 tokens * 1.05 / 8 experts = 2.1 -> ceil 3 -> multiple of 4: 4.
        (dict(num_tokens=16, num_experts=8, capacity_factor=1.05), 4),
        (dict(num_tokens=16, num_experts=8, capacity_factor=1.05, multiple_of=1), 3),
        # round(2.1) = 2.
        (
            dict(
                num_tokens=16,
                num_experts=8,
                capacity_factor=1.05,
                ceil_or_round="round",
                multiple_of=1,
            ),
            2,
        ),
        # Token Choice, K=2, S=520: 1040 * 1.05 / 32 = 34.125 -> 35 -> 36.
        (dict(num_tokens=1040, num_experts=32, capacity_factor=1.05), 36),
        # Expert Choice factor 2, S=520: 520 * 2 / 32 = 32.5 -> 33 -> 36.
        (dict(num_tokens=520, num_experts=32, capacity_factor=2.0), 36),
        # Exact: 64 * 1.0 / 8 = 8.
        (dict(num_tokens=64, num_experts=8, capacity_factor=1.0), 8),
        # Explicit capacity is returned as is, no rounding.
        (dict(num_tokens=64, num_experts=8, capacity=5), 5),
    ],
)
def test_capacity_values(kwargs, expected):
    assert compute_capacity(**kwargs) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tokens=8, num_experts=4), "exactly one"),
        (
            dict(num_tokens=8, num_experts=4, capacity_factor=1.0, capacity=2),
            "exactly one",
        ),
        (dict(num_tokens=8, num_experts=4, capacity=0), "capacity"),
        (dict(num_tokens=8, num_experts=0, capacity_factor=1.0), "num_experts"),
        (dict(num_tokens=0, num_experts=4, capacity_factor=1.0), "num_tokens"),
        (dict(num_tokens=8, num_experts=4, capacity_factor=-1.0), "capacity_factor"),
        (
            dict(num_tokens=8, num_experts=4, capacity_factor=1.0, ceil_or_round="x"),
            "ceil_or_round",
        ),
        (
            dict(num_tokens=8, num_experts=4, capacity_factor=1.0, multiple_of=0),
            "multiple_of",
        ),
        # round(2 * 0.1 / 4) = 0 < 1.
        (
            dict(
                num_tokens=2, num_experts=4, capacity_factor=0.1, ceil_or_round="round"
            ),
            "< 1",
        ),
    ],
)
def test_capacity_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_capacity(**kwargs)


@pytest.mark.parametrize(
    "rounding, factor, expected",
    [
        ("ceil", 1.0, 19),  # 74 * 2 * 1.0 / 8 = 18.5
        ("round", 1.0, 18),  # Python's round: half to even
        ("round", 1.05, 19),  # 19.425
        ("ceil", 1.05, 20),
    ],
)
def test_router_capacity_ceil_or_round(rounding, factor, expected):
    """vmoe's `capacity_ceil_or_round` (vmoe/moe.py, `compute_capacity`)."""
    from keras_vmoe.routers import SoftmaxTokenChoiceRouter

    router = SoftmaxTokenChoiceRouter(
        8,
        capacity_factor=factor,
        capacity_multiple_of=1,
        capacity_ceil_or_round=rounding,
    )
    assert router.slots_per_expert(74, training=True) == expected
    config = router.get_config()
    assert config["capacity_ceil_or_round"] == rounding
    assert SoftmaxTokenChoiceRouter.from_config(config).slots_per_expert(74) == expected
    # Then rounded up to the multiple (here 4), as vmoe does.
    router = SoftmaxTokenChoiceRouter(
        8, capacity_factor=factor, capacity_ceil_or_round=rounding
    )
    assert router.slots_per_expert(74) == -(-expected // 4) * 4


def test_router_capacity_ceil_or_round_errors():
    from keras_vmoe.routers import SoftmaxExpertChoiceRouter

    with pytest.raises(
        ValueError, match="`capacity_ceil_or_round` must be 'ceil' or 'round'"
    ):
        SoftmaxExpertChoiceRouter(4, capacity_ceil_or_round="floor")
    config = SoftmaxExpertChoiceRouter(4).get_config()
    assert config["capacity_ceil_or_round"] == "ceil"
    config.pop("capacity_ceil_or_round")  # configs saved before the option
    assert (
        SoftmaxExpertChoiceRouter.from_config(config).capacity_ceil_or_round == "ceil"
    )
