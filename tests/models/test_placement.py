"""MoE placement specs resolve to the block indices worked out by hand."""

import pytest

from keras_vmoe.models import parse_moe_layers


@pytest.mark.parametrize(
    "spec, num_layers, expected",
    [
        # V-MoE "Every n": blocks n-1, 2n-1, ...
        ("every:2", 12, (1, 3, 5, 7, 9, 11)),
        ("every:2", 8, (1, 3, 5, 7)),
        ("every:3", 8, (2, 5)),
        ("every:1", 3, (0, 1, 2)),
        # V-MoE "Last n": the last n odd blocks (S/32 "Last 2" = 5, 7).
        ("last_odd:2", 8, (5, 7)),
        ("last_odd:5", 12, (3, 5, 7, 9, 11)),
        ("last_odd:1", 12, (11,)),
        ("last_odd:0", 12, ()),
        ("last_odd:3", 3, (1,)),  # more than available: all odd blocks
        # Soft MoE "last n": the last n contiguous blocks.
        ("last:6", 12, (6, 7, 8, 9, 10, 11)),
        ("last:2", 8, (6, 7)),
        ("last:0", 8, ()),
        ("last:5", 2, (0, 1)),
        ("LAST:2", 4, (2, 3)),
        # Explicit lists, "all", "none".
        ([3, 1, 1], 4, (1, 3)),
        ((0, -1), 4, (0, 3)),
        ([], 4, ()),
        ("all", 3, (0, 1, 2)),
        ("none", 3, ()),
        (None, 3, ()),
    ],
)
def test_placement(spec, num_layers, expected):
    assert parse_moe_layers(spec, num_layers) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("every:0", "n must be >= 1"),
        ("last:-1", "n must be >= 0"),
        ("first:2", "Unknown MoE placement"),
        ("every", "Unknown MoE placement"),
        ("every:x", "is not an integer"),
        ([4], "out of range"),
        ([-5], "out of range"),
        (["a"], "Invalid MoE placement"),
    ],
)
def test_bad_placement(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_moe_layers(spec, 4)


def test_vmoe_paper_placements():
    # google-research/vmoe configs: Every 2 on B (12 blocks), Last 2 on S (8).
    assert parse_moe_layers("every:2", 12) == tuple(range(1, 12, 2))
    assert parse_moe_layers("last_odd:2", 8) == tuple(range(1, 8, 2))[-2:]
