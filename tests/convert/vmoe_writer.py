"""A writer of google-research/vmoe partitioned checkpoints, for the tests.

Written from the format description of the fixtures
(/work/shared/fixtures/vmoe_reference/README.md and vmoe's
`vmoe/checkpoints/{partitioned,serialization}.py`), independently of the
reader in `keras_vmoe.convert`, so that tests can build synthetic
checkpoints: chunked across shards, split into several pieces, in the
current layout (`version` "20220622") or the older one without it, and with
parameter shapes worked out from a vmoe model config (`vmoe_param_shapes`).
The conversion benchmark uses it for a B/16-size checkpoint, so it writes
each shard as a stream, one chunk at a time.
"""

import math
import os

import msgpack
import numpy as np

MAGIC = "__msgpack_array_chunk_a87ca2__"
VERSION = "20220622"


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def _slice_nd(chunk):
    """SliceNd bytes: a packed tuple of packed (start, stop, step) triples."""
    return _pack(tuple(_pack((int(a), int(b), None)) for a, b in chunk))


def _index_info(shape, dtype_name, chunks, shards):
    shaped = _pack((tuple(int(s) for s in shape), dtype_name, False, {}))
    return msgpack.ExtType(
        8, _pack((shaped, tuple(_slice_nd(c) for c in chunks), tuple(shards)))
    )


def _ndarray(flat):
    return msgpack.ExtType(1, _pack((flat.shape, flat.dtype.name, flat.tobytes("C"))))


def flatten(tree, prefix=()):
    """`[(path tuple, array)]` in jax.tree_util order (keys sorted, depth first)."""
    leaves = []
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            leaves += flatten(value, prefix + (key,))
        else:
            leaves.append((prefix + (key,), np.asarray(value)))
    return leaves


def _chunks(shape, itemsize, max_chunk_bytes):
    """Chunks of an array: split along its first axis longer than 1."""
    full = tuple((0, n) for n in shape)
    size = math.prod(shape) * itemsize
    if not max_chunk_bytes or size <= max_chunk_bytes or not shape:
        return [full]
    axis = next((i for i, n in enumerate(shape) if n > 1), None)
    if axis is None:
        return [full]
    parts = min(shape[axis], math.ceil(size / max_chunk_bytes))
    bounds = np.linspace(0, shape[axis], parts + 1).round().astype(int)
    return [
        full[:axis] + ((int(a), int(b)),) + full[axis + 1 :]
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]


def write_vmoe_checkpoint(
    prefix,
    params,
    *,
    num_shards=1,
    max_chunk_bytes=None,
    max_piece_bytes=None,
    legacy=False,
):
    """Writes `params` as a vmoe partitioned checkpoint `PREFIX.{index,data-*}`.

    Args:
        prefix: str. The checkpoint prefix.
        params: dict. Nested dicts of NumPy arrays (any dtype, bfloat16
            through ml_dtypes).
        num_shards: int. Number of `.data` files; chunks go to the shards
            round-robin. Defaults to 1.
        max_chunk_bytes: int or None. Arrays larger than this are split into
            chunks along their first axis of size > 1 (as a partitioned array
            is). Defaults to `None` (one chunk per array).
        max_piece_bytes: int or None. Each chunk's flat data is stored as
            pieces of at most this size (flax's `MAX_CHUNK_SIZE` subchunks).
            Defaults to `None` (one piece).
        legacy: bool. Write the older index layout, without `version`.
            Defaults to `False`.

    Returns:
        list of str: the files written (index first).
    """
    leaves = flatten(params)
    per_shard = [[] for _ in range(num_shards)]  # (leaf, array, chunk)
    index = {}
    turn = 0
    for leaf, (path, array) in enumerate(leaves):
        chunks = _chunks(array.shape, array.dtype.itemsize, max_chunk_bytes)
        shards = []
        for chunk in chunks:
            shard = turn % num_shards
            turn += 1
            shards.append(shard)
            per_shard[shard].append((leaf, array, chunk))
        node = index
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _index_info(array.shape, array.dtype.name, chunks, shards)
    top = {"shard_count": num_shards, "index": index}
    if not legacy:
        top["version"] = VERSION
    files = [f"{prefix}.index"]
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(files[0], "wb") as f:
        f.write(_pack(top))
    for shard, items in enumerate(per_shard):
        path = f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"
        files.append(path)
        by_leaf = {}
        for leaf, array, chunk in items:
            by_leaf.setdefault(leaf, []).append((array, chunk))
        packer = msgpack.Packer(use_bin_type=True)
        with open(path, "wb") as f:
            f.write(packer.pack_map_header(len(by_leaf) + 1))
            f.write(packer.pack(MAGIC))
            f.write(packer.pack(True))
            for leaf, chunks in by_leaf.items():
                f.write(packer.pack(str(leaf)))
                f.write(packer.pack_array_header(len(chunks)))
                for array, chunk in chunks:
                    flat = np.ascontiguousarray(
                        array[tuple(slice(a, b) for a, b in chunk)]
                    ).reshape(-1)
                    step = flat.size
                    if max_piece_bytes:
                        step = max(1, max_piece_bytes // flat.dtype.itemsize)
                    pieces = [flat[i : i + step] for i in range(0, flat.size, step)]
                    f.write(packer.pack_array_header(2))
                    f.write(packer.pack_array_header(len(pieces)))
                    for piece in pieces:
                        f.write(packer.pack(_ndarray(piece)))
                    f.write(packer.pack(msgpack.ExtType(6, _slice_nd(chunk))))
    return files


def vmoe_param_shapes(config, image_size):
    """`{path: shape}` of `vmoe.nn.models.VisionTransformerMoe(**config)`.

    Worked out from vmoe's modules (`vmoe/nn/vit_moe.py`, its routers and
    flax's layers) for square images of `image_size` pixels and 3 channels.
    """
    ph, pw = config["patch_size"]
    d = config["hidden_size"]
    enc = config["encoder"]
    heads, mlp = enc["num_heads"], enc["mlp_dim"]
    token = config.get("classifier", "token") == "token"
    tokens = (image_size // ph) * (image_size // pw) + int(token)
    shapes = {
        "embedding/kernel": (ph, pw, 3, d),
        "embedding/bias": (d,),
        "Encoder/posembed_input/pos_embedding": (1, tokens, d),
        "Encoder/encoder_norm/scale": (d,),
        "Encoder/encoder_norm/bias": (d,),
    }
    if token:
        shapes["cls"] = (1, 1, d)
    moe = enc.get("moe") or {}
    for i in range(enc["num_layers"]):
        block = f"Encoder/encoderblock_{i}/"
        for n in (0, 1):
            shapes[block + f"LayerNorm_{n}/scale"] = (d,)
            shapes[block + f"LayerNorm_{n}/bias"] = (d,)
        for n in ("query", "key", "value"):
            shapes[block + f"SelfAttention/{n}/kernel"] = (d, heads, d // heads)
            shapes[block + f"SelfAttention/{n}/bias"] = (heads, d // heads)
        shapes[block + "SelfAttention/out/kernel"] = (heads, d // heads, d)
        shapes[block + "SelfAttention/out/bias"] = (d,)
        if enc.get("attention_qk_norm"):
            shapes[block + "SelfAttention/query_ln/scale"] = (d // heads,)
            shapes[block + "SelfAttention/key_ln/scale"] = (d // heads,)
        if i in moe.get("layers", ()):
            e, h = moe["num_experts"], moe.get("mlp_dim", mlp)
            shapes[block + "Moe/Mlp/Dense_0/kernel"] = (e, d, h)
            shapes[block + "Moe/Mlp/Dense_0/bias"] = (e, h)
            shapes[block + "Moe/Mlp/Dense_1/kernel"] = (e, h, d)
            shapes[block + "Moe/Mlp/Dense_1/bias"] = (e, d)
            router = moe.get("router") or {}
            if router.get("name", "").endswith("SoftRouter"):
                slots = router.get("num_slots") or max(
                    1, round(moe["group_size"] * router.get("capacity_factor", 1.0) / e)
                )
                shapes[block + "Moe/Router/mu"] = (d, e, slots)
                shapes[block + "Moe/Router/scale"] = ()
            else:
                shapes[block + "Moe/Router/dense/kernel"] = (d, e)
        else:
            shapes[block + "Mlp/Dense_0/kernel"] = (d, mlp)
            shapes[block + "Mlp/Dense_0/bias"] = (mlp,)
            shapes[block + "Mlp/Dense_1/kernel"] = (mlp, d)
            shapes[block + "Mlp/Dense_1/bias"] = (d,)
    features = d
    if config.get("representation_size") is not None:
        features = config["representation_size"]
        shapes["pre_logits/kernel"] = (d, features)
        shapes["pre_logits/bias"] = (features,)
    shapes["head/kernel"] = (features, config["num_classes"])
    shapes["head/bias"] = (config["num_classes"],)
    return shapes


def random_params(shapes, seed=0, dtype="float32", scale=0.1):
    """Nested dicts of random arrays with the given `{path: shape}`."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path, shape in shapes.items():
        node = tree
        *parents, name = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = (rng.standard_normal(shape, dtype="float32") * scale).astype(dtype)
    return tree
