"""Reading google-research/vmoe's partitioned checkpoints with msgpack and NumPy.

A vmoe checkpoint (`vmoe.checkpoints.partitioned.save_checkpoint`, the
format of the released `gs://vmoe_checkpoints/*`) is a prefix `PREFIX` and

- `PREFIX.index`: a msgpack map `{"shard_count": n, "index": tree}` (plus
  `"version": "20220622"` in checkpoints written since that date; the
  released checkpoints predate it and have no `version`). `tree` mirrors the
  parameter tree (nested maps); each leaf is an msgpack `ExtType(8)` whose
  payload packs `(global shape, global slices, shards)`: the array's shape
  and dtype name, the `(start, stop, step)` slices of its chunks, and the
  shard that stores each chunk.
- `PREFIX.data-SSSSS-of-NNNNN`, one file per shard: a msgpack map
  `{"__msgpack_array_chunk_a87ca2__": True, "<leaf number>": [[pieces,
  global slice], ...], ...}`. Leaves are numbered in the depth-first,
  key-sorted order of the index tree (`jax.tree_util` order); a chunk is
  stored flat, split into `pieces` (`ExtType(1)` ndarrays: shape, dtype name,
  C-order bytes), and its global slice is an `ExtType(6)`.

`read_vmoe_checkpoint` returns the tree as nested dicts of NumPy arrays
(bfloat16 through `ml_dtypes`), without vmoe, flax, JAX or TensorFlow.
The shards are streamed one at a time, each decoded one chunk at a time.
`iter_vmoe_blocks` yields every parameter in blocks as they are read (a
parameter whole, or the part of it a shard holds), so a consumer that writes
each block into its destination (the converter writes it into the Keras
weight) never holds a second copy of the model: only the block being
decoded. `iter_vmoe_checkpoint` yields whole arrays (holding the parts of
arrays split across shards until their last shard is read), and
`read_vmoe_checkpoint` the whole tree.
"""

import collections
import math
import os

import ml_dtypes
import msgpack
import numpy as np

ARRAY_CHUNKS_KEY = "__msgpack_array_chunk_a87ca2__"
# vmoe's `partitioned.Version`: the index layouts this reader knows.
VERSION_V1 = "20220622"
KNOWN_VERSIONS = (None, VERSION_V1)

_EXT_NDARRAY = 1
_EXT_SLICE_ND = 6
_EXT_INDEX_INFO = 8


class CheckpointError(ValueError):
    """A file that is not a (complete, valid) vmoe checkpoint file.

    The message names the file, and the parameter when one is concerned.
    """


ArrayInfo = collections.namedtuple(
    "ArrayInfo", ["path", "shape", "dtype", "slices", "shards"]
)
ArrayInfo.__doc__ = """One parameter of a vmoe checkpoint, from its index.

Fields:
    path: str. Its path in the tree, keys joined by `/`
        (`"Encoder/encoderblock_0/Mlp/Dense_0/kernel"`).
    shape: tuple of int. The whole array's shape.
    dtype: `numpy.dtype`. Its dtype (`ml_dtypes.bfloat16` for bfloat16).
    slices: tuple of chunks, each a tuple of `(start, stop)` per axis.
    shards: tuple of int. The shard that stores each chunk.
"""


class VmoeIndex:
    """The index of a vmoe checkpoint: what each shard holds.

    Made by `read_vmoe_index`.

    Attributes:
        prefix: str. The checkpoint prefix.
        version: str or None. The index's `version` (`"20220622"`), or
            `None` for the older layout without it.
        shard_count: int. Number of `.data` files.
        arrays: list of `ArrayInfo`, in leaf-number order.
    """

    def __init__(self, prefix, version, shard_count, arrays):
        self.prefix = prefix
        self.version = version
        self.shard_count = shard_count
        self.arrays = list(arrays)

    @property
    def shapes(self):
        """`{path: shape}` of every parameter."""
        return {a.path: a.shape for a in self.arrays}

    def shard_path(self, shard):
        """The `.data` file of shard number `shard`."""
        return f"{self.prefix}.data-{shard:05d}-of-{self.shard_count:05d}"

    def shards_used(self):
        """The shard numbers that hold at least one chunk, sorted."""
        return sorted({s for a in self.arrays for s in a.shards})

    def check_files(self):
        """Raises `FileNotFoundError` naming the first missing `.data` file."""
        for shard in self.shards_used():
            path = self.shard_path(shard)
            if not os.path.isfile(path):
                owners = [a.path for a in self.arrays if shard in a.shards]
                raise FileNotFoundError(
                    f"Missing vmoe checkpoint shard {path!r} (shard {shard} of "
                    f"{self.shard_count}; it holds {len(owners)} parameter "
                    f"chunk(s), e.g. {owners[0]!r})."
                )


def _unpack(data, what, path):
    """msgpack-decodes a nested payload, naming `path` on failure."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 (msgpack raises several kinds)
        raise CheckpointError(f"{path}: cannot decode {what}: {e}") from None


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _dtype(name, where):
    name = _text(name)
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: dtype name {name!r} is not a string.")
    if hasattr(ml_dtypes, name) and name not in ("finfo", "iinfo"):
        return np.dtype(getattr(ml_dtypes, name))
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise CheckpointError(f"{where}: unknown dtype {name!r}.") from None
    if dtype.kind not in "biuf":
        raise CheckpointError(f"{where}: unsupported dtype {name!r}.")
    return dtype


def _slice_nd(data, where):
    """`ExtType(6)` payload (or its packed bytes) -> ((start, stop), ...)."""
    result = []
    for axis in _unpack(data, "a slice", where):
        start, stop, step = _unpack(axis, "a slice", where)
        if step not in (None, 1) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)
        ):
            raise CheckpointError(f"{where}: unsupported slice {(start, stop, step)}.")
        result.append((start, stop))
    return tuple(result)


def _index_info(data, index_path, leaf_path):
    where = f"{index_path} (parameter {leaf_path!r})"
    try:
        shaped, slices, shards = _unpack(data, "an index entry", where)
        shape, dtype_name = _unpack(shaped, "a shape", where)[:2]
        shape = tuple(int(s) for s in shape)
        shards = tuple(int(s) for s in shards)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: malformed index entry ({e}).") from None
    slices = tuple(_slice_nd(s, where) for s in slices)
    if len(slices) != len(shards) or not slices:
        raise CheckpointError(f"{where}: malformed index entry (slices vs shards).")
    covered = 0
    for chunk in slices:
        if len(chunk) != len(shape) or not all(
            0 <= a < b <= n for (a, b), n in zip(chunk, shape)
        ):
            raise CheckpointError(
                f"{where}: chunk {chunk} does not fit the shape {shape}."
            )
        covered += math.prod(b - a for a, b in chunk)
    if len(set(slices)) != len(slices) or covered != math.prod(shape):
        raise CheckpointError(
            f"{where}: the chunks of the {shape} array do not cover it exactly once."
        )
    return ArrayInfo(leaf_path, shape, _dtype(dtype_name, where), slices, shards)


def read_vmoe_index(prefix):
    """Reads `PREFIX.index` of a vmoe checkpoint.

    Both layouts are read: with the `version` key (`"20220622"`) and the
    older one without it (the released checkpoints). Nothing is read from the
    `.data` shards.

    Args:
        prefix: str. The checkpoint prefix (the path without `.index`).

    Returns:
        `VmoeIndex`.

    Raises:
        FileNotFoundError: no `PREFIX.index`.
        CheckpointError: the file is not a vmoe checkpoint index (the
            message names the file).

    Example:

    ```python
    index = read_vmoe_index("checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1")
    index.shapes["Encoder/encoderblock_7/Moe/Mlp/Dense_0/kernel"]  # (8, 512, 2048)
    ```
    """
    prefix = os.fspath(prefix)
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No vmoe checkpoint index {path!r}.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        top = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=lambda code, payload: msgpack.ExtType(code, payload),
        )
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is not a vmoe checkpoint index (not msgpack: {e})."
        ) from None
    if (
        not isinstance(top, dict)
        or not isinstance(top.get("index"), dict)
        or not isinstance(top.get("shard_count"), int)
        or isinstance(top.get("shard_count"), bool)
        or top["shard_count"] < 1
    ):
        keys = sorted(map(str, top)) if isinstance(top, dict) else type(top).__name__
        raise CheckpointError(
            f"{path} is not a vmoe checkpoint index: expected a map with "
            f"'shard_count' and 'index', got {keys}."
        )
    version = top.get("version")
    if version not in KNOWN_VERSIONS:
        raise CheckpointError(
            f"{path}: unsupported vmoe checkpoint version {version!r} (known: "
            f"{VERSION_V1!r} and the older layout without a version)."
        )
    extra = sorted(set(top) - {"index", "shard_count", "version"})
    if extra:
        raise CheckpointError(f"{path}: unexpected keys {extra} in a vmoe index.")
    arrays = []
    for leaf_path, leaf in _leaves(top["index"], path):
        if not (isinstance(leaf, msgpack.ExtType) and leaf.code == _EXT_INDEX_INFO):
            raise CheckpointError(
                f"{path} is not a vmoe checkpoint index: the entry {leaf_path!r} "
                f"is {type(leaf).__name__}, not an index record (ExtType 8)."
            )
        info = _index_info(leaf.data, path, leaf_path)
        bad = [s for s in info.shards if not 0 <= s < top["shard_count"]]
        if bad:
            raise CheckpointError(
                f"{path}: parameter {leaf_path!r} is stored in shard {bad[0]}, but "
                f"the checkpoint has {top['shard_count']} shard(s)."
            )
        arrays.append(info)
    if not arrays:
        raise CheckpointError(f"{path}: the vmoe checkpoint index holds no array.")
    return VmoeIndex(prefix, version, top["shard_count"], arrays)


def _leaves(tree, index_path, prefix=()):
    """(path, leaf) in jax.tree_util order: depth first, keys sorted."""
    for key in sorted(tree, key=str):
        if not isinstance(key, str):
            raise CheckpointError(f"{index_path}: non-string key {key!r} in the index.")
        value = tree[key]
        if isinstance(value, dict):
            if not value:
                continue  # an empty subtree has no leaves
            yield from _leaves(value, index_path, prefix + (key,))
        else:
            yield "/".join(prefix + (key,)), value


def _ndarray(payload):
    """An `ExtType(1)` payload `(shape, dtype name, bytes)` as an array.

    A view on `payload` (no copy of the data): the small header is decoded
    with msgpack, the bytes are located after it.
    """
    header = msgpack.Unpacker(raw=False)
    header.feed(payload[:512])
    try:
        if header.read_array_header() != 3:
            raise ValueError("not a (shape, dtype, data) triple")
        shape, dtype_name = header.unpack(), header.unpack()
        offset = header.tell()
        tag = payload[offset]
        widths = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
        width = widths[tag]  # bin 8/16/32 (or raw str 8/16/32, older packers)
        length = int.from_bytes(payload[offset + 1 : offset + 1 + width], "big")
        start = offset + 1 + width
    except (msgpack.OutOfData, KeyError, IndexError):  # an unusual header
        shape, dtype_name, data = msgpack.unpackb(payload, raw=False)
        payload, start, length = data, 0, len(data)
    dtype = _dtype(dtype_name, "an array chunk")
    shape = tuple(int(n) for n in shape)
    count = math.prod(shape)
    if count * dtype.itemsize != length or start + length > len(payload):
        raise CheckpointError(
            f"an array chunk of shape {shape} and dtype {dtype} holds {length} bytes."
        )
    return np.frombuffer(payload, dtype=dtype, count=count, offset=start).reshape(shape)


def _data_ext_hook(code, payload):
    if code == _EXT_NDARRAY:
        return _ndarray(payload)
    if code == _EXT_SLICE_ND:
        return _Slices(_slice_nd(payload, "a chunk"))
    return msgpack.ExtType(code, payload)


class _Slices(tuple):
    """The decoded global slice of a chunk (an `ExtType(6)`)."""


def iter_vmoe_blocks(prefix, index=None):
    """Yields every parameter in blocks, streaming one shard at a time.

    The lowest level of the reader, for a consumer that writes each block
    into its destination (the converter writes it into the Keras weight):
    nothing is held between blocks. A parameter stored whole in one shard is
    one block; the chunks a shard holds of a parameter split across shards
    come as one block when they tile a box (as a partitioned array's do),
    else chunk by chunk. Each shard is decoded as a stream, one chunk at a
    time, never loaded whole; everything is checked against the index.

    Args:
        prefix: str. The checkpoint prefix.
        index: `VmoeIndex` or None. The index, if already read. Defaults to
            `None` (read it).

    Yields:
        `(info, region, block)`: the parameter's `ArrayInfo`, the region
        `((start, stop), ...)` per axis, and the block (a NumPy array of the
        region's shape, in the stored dtype).

    Raises:
        FileNotFoundError: a `.data` shard the index refers to is missing
            (the message names it).
        CheckpointError: a shard is truncated or corrupt, or holds other
            chunks than the index says (the message names the file and the
            parameter).
    """
    prefix = os.fspath(prefix)
    if index is None:
        index = read_vmoe_index(prefix)
    index.check_files()
    arrays = index.arrays
    expected = {}  # (leaf, chunk) -> shard
    for leaf, info in enumerate(arrays):
        for chunk, shard in zip(info.slices, info.shards):
            expected[(leaf, chunk)] = shard
    for shard in index.shards_used():
        path = index.shard_path(shard)
        group = []  # the chunks of one parameter in this shard
        for leaf, chunk, data in _read_shard(path, len(arrays)):
            if chunk is None:  # its last chunk here: yield it
                yield from _blocks(arrays, leaf, group)
                group = []
                continue
            info = arrays[leaf]
            where = f"{path}: parameter {info.path!r}"
            if expected.pop((leaf, chunk), None) != shard:
                raise CheckpointError(
                    f"{where}: unexpected chunk {chunk} (the index puts the chunks "
                    f"{list(info.slices)} of this {info.shape} array in shards "
                    f"{list(info.shards)})."
                )
            size = math.prod(b - a for a, b in chunk)
            if data.size != size:
                raise CheckpointError(
                    f"{where}: chunk {chunk} holds {data.size} values, expected {size}."
                )
            if data.dtype != info.dtype:
                raise CheckpointError(
                    f"{where}: chunk of dtype {data.dtype}, the index says {info.dtype}."
                )
            group.append((chunk, data))
            del data
        missing = [(leaf, chunk) for (leaf, chunk), s in expected.items() if s == shard]
        if missing:
            leaf, chunk = missing[0]
            raise CheckpointError(
                f"{path}: the shard lacks chunk {chunk} of parameter "
                f"{arrays[leaf].path!r} (and {len(missing) - 1} more); the "
                "file is incomplete or belongs to another checkpoint."
            )


def _blocks(arrays, leaf, group):
    """The chunks `[(chunk, flat data)]` of one parameter as blocks."""
    if not group:
        return
    info = arrays[leaf]
    box = tuple(
        (min(c[axis][0] for c, _ in group), max(c[axis][1] for c, _ in group))
        for axis in range(len(info.shape))
    )
    volume = sum(data.size for _, data in group)  # chunks are disjoint (index)
    if len(group) > 1 and volume != math.prod(b - a for a, b in box):
        for chunk, data in group:  # no box: one block per chunk
            yield info, chunk, data.reshape(tuple(b - a for a, b in chunk))
        return
    shape = tuple(b - a for a, b in box)
    if len(group) == 1:
        block = group[0][1].reshape(shape).copy()  # writable, owns its data
    else:
        block = np.empty(shape, info.dtype)
        for chunk, data in group:
            where = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(chunk, box))
            block[where] = data.reshape(tuple(b - a for a, b in chunk))
    group.clear()
    yield info, box, block


def iter_vmoe_checkpoint(prefix, index=None):
    """Yields `(path, array)` for every parameter, reading one shard at a time.

    An array is yielded as soon as all its chunks have been read: an array
    stored in one shard when that shard is read, an array whose chunks lie
    in several shards after the last of them (it is reassembled; until then
    its part is held). Each shard is decoded as a stream, never loaded
    whole. To write the parts of split arrays into their destination as
    they come instead, use `iter_vmoe_blocks`.

    Args:
        prefix: str. The checkpoint prefix.
        index: `VmoeIndex` or None. The index, if already read. Defaults to
            `None` (read it).

    Yields:
        `(path, numpy.ndarray)`: the `/`-joined path and the array, in its
        stored dtype.

    Raises:
        FileNotFoundError: a `.data` shard the index refers to is missing
            (the message names it).
        CheckpointError: a shard is truncated or corrupt, or holds other
            chunks than the index says (the message names the file and the
            parameter).
    """
    pending = {}  # path -> (partly filled array, values still missing)
    for info, region, block in iter_vmoe_blocks(prefix, index):
        if block.shape == info.shape:
            yield info.path, block
            continue
        array, missing = pending.get(info.path) or (
            np.empty(info.shape, info.dtype),
            math.prod(info.shape),
        )
        array[tuple(slice(a, b) for a, b in region)] = block
        missing -= block.size
        del block
        if missing:
            pending[info.path] = (array, missing)
        else:
            pending.pop(info.path, None)
            yield info.path, array


def _read_shard(path, num_leaves):
    """Yields `(leaf, chunk slices, flat data)` of one `.data` file, streamed.

    After the chunks of each parameter, `(leaf, None, None)` marks its end.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(
            f,
            raw=False,
            strict_map_key=False,
            ext_hook=_data_ext_hook,
            max_buffer_size=0,  # 4 GiB: a chunk piece may be large
            read_size=1 << 20,
        )
        try:
            entries = unpacker.read_map_header()
            for _ in range(entries):
                key = unpacker.unpack()
                if key == ARRAY_CHUNKS_KEY:
                    unpacker.skip()
                    continue
                try:
                    leaf = int(key)
                except (TypeError, ValueError):
                    raise CheckpointError(
                        f"{path} is not a vmoe checkpoint shard (key {key!r})."
                    ) from None
                if not 0 <= leaf < num_leaves:
                    raise CheckpointError(
                        f"{path}: chunk of array number {leaf}, but the index "
                        f"has {num_leaves} arrays."
                    )
                for _ in range(unpacker.read_array_header()):
                    if unpacker.read_array_header() != 2:
                        raise CheckpointError(
                            f"{path}: malformed chunk of array {leaf}."
                        )
                    pieces = [
                        unpacker.unpack() for _ in range(unpacker.read_array_header())
                    ]
                    chunk = unpacker.unpack()
                    if not isinstance(chunk, _Slices) or not all(
                        isinstance(p, np.ndarray) for p in pieces
                    ):
                        raise CheckpointError(
                            f"{path}: malformed chunk of array {leaf}."
                        )
                    data = pieces[0].reshape(-1) if len(pieces) == 1 else None
                    if data is None:
                        data = np.concatenate([p.reshape(-1) for p in pieces])
                    del pieces
                    yield leaf, tuple(chunk), data
                    del data  # before the next chunk is decoded
                yield leaf, None, None  # the parameter's last chunk in this shard
            end = unpacker.tell()
        except CheckpointError:
            raise
        except msgpack.OutOfData:
            raise CheckpointError(
                f"{path}: the vmoe checkpoint shard is truncated (it ends "
                f"after {size} bytes, inside its data)."
            ) from None
        except Exception as e:  # noqa: BLE001 (msgpack raises several kinds)
            raise CheckpointError(
                f"{path} is not a valid vmoe checkpoint shard ({type(e).__name__}: {e})."
            ) from None
    if end != size:
        raise CheckpointError(
            f"{path}: {size - end} unexpected bytes after the shard's data."
        )


def read_vmoe_checkpoint(prefix):
    """Reads a vmoe checkpoint into a nested dict of NumPy arrays.

    The format of google-research/vmoe's partitioned checkpoints, as
    released in `gs://vmoe_checkpoints/` (`PREFIX.index` plus
    `PREFIX.data-NNNNN-of-NNNNN`, all msgpack), read with msgpack and NumPy
    only (`ml_dtypes` for bfloat16): no vmoe, flax, JAX or TensorFlow.
    Both index layouts are read (with and without the `version` key);
    arrays split into chunks across several shards are reassembled; the
    shards are streamed one at a time (see `iter_vmoe_checkpoint`).

    Args:
        prefix: str. The checkpoint prefix, e.g.
            `"checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1"` for the
            files `...light1.index` and `...light1.data-00000-of-00001`.

    Returns:
        dict. The parameter tree as nested dicts (vmoe's names, e.g.
        `tree["Encoder"]["encoderblock_0"]["Mlp"]["Dense_0"]["kernel"]`),
        leaves NumPy arrays in their stored dtype.

    Raises:
        FileNotFoundError: the index or a shard is missing (named).
        CheckpointError: (a `ValueError`) a file is not a valid vmoe
            checkpoint file, or is truncated (named).

    Example:

    ```python
    params = read_vmoe_checkpoint("checkpoints/vmoe_b16_imagenet21k_randaug_strong")
    params["Encoder"]["posembed_input"]["pos_embedding"].shape  # (1, 197, 768)
    ```
    """
    tree = {}
    for path, array in iter_vmoe_checkpoint(prefix):
        *parents, name = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = array
    return tree
