"""read_vmoe_checkpoint: both layouts, chunks across shards, streaming, bad files."""

import os
import pathlib
import shutil

import ml_dtypes
import msgpack
import numpy as np
import pytest

from keras_vmoe.convert import (
    CheckpointError,
    checkpoint,
    iter_vmoe_checkpoint,
    read_vmoe_checkpoint,
    read_vmoe_index,
)
from tests.convert.vmoe_writer import flatten, write_vmoe_checkpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "vmoe_reference"


def _tree():
    rng = np.random.default_rng(0)
    return {
        "Encoder": {
            "encoderblock_1": {
                "Moe": {
                    "Mlp": {
                        "Dense_0": {
                            "kernel": rng.normal(size=(4, 6, 10)).astype("float32")
                        }
                    }
                },
                "LayerNorm_0": {"scale": np.arange(6, dtype="float32")},
            },
            "encoderblock_10": {
                "LayerNorm_0": {"bias": np.full((6,), -1.5, "float32")}
            },
        },
        "bf16": (rng.normal(size=(5, 3)) * 8).astype(ml_dtypes.bfloat16),
        "scalar": np.array(3.25, "float32"),
        "ints": np.arange(12, dtype="int32").reshape(3, 4),
        "head": {"kernel": rng.normal(size=(7, 3)).astype("float32")},
    }


def _assert_same_tree(got, expected, path=()):
    assert sorted(got) == sorted(expected), path
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_same_tree(got[key], value, path + (key,))
        else:
            value = np.asarray(value)
            assert got[key].dtype == value.dtype, path + (key,)
            assert got[key].shape == value.shape, path + (key,)
            np.testing.assert_array_equal(got[key], value, err_msg=str(path + (key,)))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "num_shards, max_chunk_bytes, max_piece_bytes", [(1, None, None), (3, 64, 40)]
)
def test_round_trip(tmp_path, legacy, num_shards, max_chunk_bytes, max_piece_bytes):
    tree = _tree()
    prefix = str(tmp_path / "ckpt")
    files = write_vmoe_checkpoint(
        prefix,
        tree,
        num_shards=num_shards,
        max_chunk_bytes=max_chunk_bytes,
        max_piece_bytes=max_piece_bytes,
        legacy=legacy,
    )
    assert len(files) == 1 + num_shards
    index = read_vmoe_index(prefix)
    assert index.version == (None if legacy else "20220622")
    assert index.shard_count == num_shards
    kernel = index.shapes["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"]
    assert kernel == (4, 6, 10)
    if max_chunk_bytes:  # 960 bytes in chunks of at most 64: split on axis 0
        info = next(a for a in index.arrays if a.path.endswith("Dense_0/kernel"))
        assert len(info.slices) == 4 and len(set(info.shards)) == 3
    dtypes = {a.path: a.dtype for a in index.arrays}
    assert dtypes["bf16"] == ml_dtypes.bfloat16 and dtypes["ints"] == np.int32
    # Leaf order: keys sorted ("E" < "b"), depth first; "encoderblock_10"
    # before "encoderblock_1/..." is not a question: "encoderblock_1" < "..._10".
    assert [a.path for a in index.arrays][:3] == [
        "Encoder/encoderblock_1/LayerNorm_0/scale",
        "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel",
        "Encoder/encoderblock_10/LayerNorm_0/bias",
    ]
    _assert_same_tree(read_vmoe_checkpoint(prefix), tree)


def test_fixture_index_and_chunks():
    # Written by vmoe: arrays in chunks spread over 2 shards.
    index = read_vmoe_index(str(FIXTURES / "vmoe_tc_k2_bpr" / "ckpt"))
    assert index.version == "20220622" and index.shard_count == 2
    info = next(
        a
        for a in index.arrays
        if a.path == "Encoder/encoderblock_3/Moe/Mlp/Dense_0/kernel"
    )
    assert info.shape == (8, 24, 40) and len(info.slices) == 16
    assert set(info.shards) == {0, 1}
    # Leaf numbers follow the key-sorted order: the first is Encoder/encoder_norm/bias.
    assert index.arrays[0].path == "Encoder/encoder_norm/bias"
    legacy = read_vmoe_index(str(FIXTURES / "vmoe_tc_k2_bpr" / "ckpt_legacy"))
    assert legacy.version is None
    assert [a[:3] for a in legacy.arrays] == [a[:3] for a in index.arrays]


def test_streams_shard_by_shard(tmp_path, monkeypatch):
    """Arrays wholly in shard 0 come out before shard 1 is opened."""
    prefix = str(tmp_path / "ckpt")
    tree = {f"w{i}": np.full((4,), i, "float32") for i in range(6)}
    tree["split"] = np.arange(40, dtype="float32").reshape(10, 4)
    write_vmoe_checkpoint(prefix, tree, num_shards=2, max_chunk_bytes=16)
    opened = []
    real = checkpoint._read_shard

    def spy(path, num_leaves):
        opened.append(os.path.basename(path))
        yield from real(path, num_leaves)

    monkeypatch.setattr(checkpoint, "_read_shard", spy)
    stream = iter_vmoe_checkpoint(prefix)
    first_path, first = next(stream)
    assert opened == ["ckpt.data-00000-of-00002"]
    assert first_path == "split" or first.shape == (4,)
    rest = dict(stream)
    rest[first_path] = first
    assert opened == ["ckpt.data-00000-of-00002", "ckpt.data-00001-of-00002"]
    # The split array (chunks in both shards) is reassembled.
    np.testing.assert_array_equal(rest["split"], tree["split"])
    assert sorted(rest) == sorted(tree)


def _copy_fixture(tmp_path, name="vmoe_tc_k2_bpr"):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def test_truncated_shard_names_the_file(tmp_path):
    folder = _copy_fixture(tmp_path)
    shard = folder / "ckpt.data-00001-of-00002"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.data-00001-of-00002.*truncated"):
        read_vmoe_checkpoint(str(folder / "ckpt"))


def test_missing_shard_names_the_file(tmp_path):
    folder = _copy_fixture(tmp_path)
    (folder / "ckpt.data-00000-of-00002").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt\.data-00000-of-00002"):
        read_vmoe_checkpoint(str(folder / "ckpt"))


def test_missing_index_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.index"):
        read_vmoe_checkpoint(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xc1\xc1 not msgpack", "not a vmoe checkpoint index"),
        (msgpack.packb({"params": [1, 2]}), r"not a vmoe checkpoint index.*'params'"),
        (msgpack.packb([1, 2, 3]), "not a vmoe checkpoint index"),
        (
            msgpack.packb({"shard_count": 1, "index": {"w": [1, 2]}}),
            r"not a vmoe checkpoint index: the entry 'w'",
        ),
        (
            msgpack.packb({"shard_count": 1, "index": {}, "version": "20990101"}),
            "unsupported vmoe checkpoint version '20990101'",
        ),
    ],
)
def test_index_that_is_not_a_vmoe_checkpoint(tmp_path, content, message):
    (tmp_path / "ckpt.index").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        read_vmoe_checkpoint(str(tmp_path / "ckpt"))
    assert "ckpt.index" in str(info.value)


def test_shard_of_another_checkpoint(tmp_path):
    """A shard whose chunks are not those the index lists is rejected."""
    write_vmoe_checkpoint(str(tmp_path / "a"), {"w": np.zeros((4, 2), "float32")})
    write_vmoe_checkpoint(
        str(tmp_path / "b"), {"w": np.zeros((4, 2), "float32")}, max_chunk_bytes=8
    )
    shutil.copy(tmp_path / "b.data-00000-of-00001", tmp_path / "a.data-00000-of-00001")
    with pytest.raises(CheckpointError, match=r"a\.data-00000-of-00001: parameter 'w'"):
        read_vmoe_checkpoint(str(tmp_path / "a"))


def test_shard_that_is_not_msgpack(tmp_path):
    write_vmoe_checkpoint(str(tmp_path / "a"), {"w": np.zeros((4, 2), "float32")})
    (tmp_path / "a.data-00000-of-00001").write_bytes(b"\x93not a map")
    with pytest.raises(CheckpointError, match=r"a\.data-00000-of-00001"):
        read_vmoe_checkpoint(str(tmp_path / "a"))


def test_writer_leaf_order_is_jax_order():
    # "encoderblock_10" sorts before "encoderblock_2", as jax.tree_util does.
    tree = {"b": {"encoderblock_2": 1, "encoderblock_10": 2}, "a": 0}
    assert [p for p, _ in flatten(tree)] == [
        ("a",),
        ("b", "encoderblock_10"),
        ("b", "encoderblock_2"),
    ]


def test_blocks_tile_each_parameter(tmp_path):
    """`iter_vmoe_blocks`: a shard's chunks of a parameter come as one block
    when they tile a box, else chunk by chunk."""
    from keras_vmoe.convert import iter_vmoe_blocks

    tree = {"a": np.arange(24, dtype="float32").reshape(6, 4), "b": np.ones(3, "int32")}
    for shards, expected in ((1, [((0, 6), (0, 4))]), (2, None)):
        prefix = str(tmp_path / f"ckpt{shards}")
        write_vmoe_checkpoint(prefix, tree, num_shards=shards, max_chunk_bytes=16)
        regions = []
        rebuilt = np.zeros((6, 4), "float32")
        for info, region, block in iter_vmoe_blocks(prefix):
            if info.path == "a":
                regions.append(region)
                rebuilt[tuple(slice(*r) for r in region)] = block
            else:
                np.testing.assert_array_equal(block, tree["b"])
        np.testing.assert_array_equal(rebuilt, tree["a"])
        if expected:  # 6 one-row chunks in one shard: one block
            assert regions == expected
        else:  # rows 0, 2, 4 in shard 0 and 1, 3, 5 in shard 1: no box
            assert sorted(regions) == [((i, i + 1), (0, 4)) for i in range(6)]


def test_blocks_hold_no_second_copy(tmp_path):
    """Consuming the blocks of a checkpoint whose arrays are split across
    shards holds only the current block (and msgpack's buffer), not the
    arrays being reassembled."""
    import tracemalloc

    from keras_vmoe.convert import iter_vmoe_blocks

    rng = np.random.default_rng(0)
    tree = {
        f"w{i}": rng.standard_normal((1024, 1024), dtype="float32") for i in range(8)
    }
    total = sum(a.nbytes for a in tree.values())  # 32 MiB
    prefix = str(tmp_path / "ckpt")
    write_vmoe_checkpoint(prefix, tree, num_shards=4, max_chunk_bytes=1 << 19)
    del tree
    tracemalloc.start()
    try:
        seen = sum(block.nbytes for _, _, block in iter_vmoe_blocks(prefix))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == total
    assert peak < total / 4, peak  # holding the split arrays would take ~total
