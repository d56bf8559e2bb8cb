"""Any batch size: a partial last routing group is routed on its own.

The rule (`MoE`, docs/routers.md "Groups"): the `N = B * T` tokens form
`N // S` whole groups and, when `S` does not divide `N`, one partial group
of the `N % S` remaining tokens, routed as a batch of its own (capacities
for its own size). Here `T = 3` tokens per example and `S = 12`, so groups
of 4 examples.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier
from tests.models.tiny import tiny_moe

T, D, S = 3, 8, 12
X = np.random.default_rng(1).normal(size=(9, T, D)).astype("float32")


def _np(x):
    return ops.convert_to_numpy(x)


def make_moe(router):
    return MoE(router, MlpExperts(router.num_experts, 16, seed=0), group_size=S)


@pytest.mark.parametrize("name", routers.ROUTER_NAMES)
def test_partial_group_is_routed_as_a_batch_of_its_own(name):
    kwargs = {} if name == "soft" else {"seed": 0}
    moe = make_moe(routers.get(name, num_experts=4, **kwargs))
    whole = _np(moe(X[:8]))  # 2 whole groups
    with moe.capture_routing() as routings:
        nine = _np(moe(X))  # 2 whole groups + 1 example (3 tokens)
    # Whole groups unchanged; the 9th example as when it runs alone.
    np.testing.assert_allclose(nine[:8], whole, atol=1e-6)
    np.testing.assert_allclose(nine[8:], _np(moe(X[8:])), atol=1e-6)
    # Batches of 7 (a whole group + 3 examples) and of 1.
    seven = _np(moe(X[:7]))
    np.testing.assert_allclose(seven[:4], whole[:4], atol=1e-6)
    np.testing.assert_allclose(seven[4:], _np(moe(X[4:7])), atol=1e-6)
    assert _np(moe(X[:1])).shape == (1, T, D)
    # The call routed (2, 12) and (1, 3) groups, each with its own capacity.
    assert [r.num_tokens for r in routings] == [S, T]
    assert [r.capacity for r in routings] == [
        moe.router.slots_per_expert(S, training=False),
        moe.router.slots_per_expert(T, training=False),
    ]


def test_partial_group_capacity_matches_numpy_expert_choice():
    # Softmax Expert Choice, E = 2, factor 1, no rounding: C = ceil(S / 2):
    # 6 slots for a whole group of 12 tokens, ceil(6 / 2) = 3 for the partial
    # group of the 2 last examples (6 tokens). Each expert takes its top-C
    # tokens by gate; a token's output is the sum of gate * f_e(x) over the
    # experts that took it.
    router = routers.SoftmaxExpertChoiceRouter(
        2, capacity_factor=1.0, capacity_multiple_of=1, seed=0
    )
    moe = MoE(router, MlpExperts(2, 16, activation="relu", seed=0), group_size=S)
    x = X[:6]  # 18 tokens: one whole group and 6 tokens
    y = _np(moe(x)).reshape(-1, D)
    kernel = _np(router.gating_kernel)
    wi, bi, wo, bo = [_np(v) for v in moe.experts.weights]
    tokens = x.reshape(-1, D)
    expected = np.zeros_like(tokens)
    for start, stop in ((0, 12), (12, 18)):
        group = tokens[start:stop]
        logits = group @ kernel
        gates = np.exp(logits - logits.max(-1, keepdims=True))
        gates /= gates.sum(-1, keepdims=True)
        capacity = -(-len(group) // 2)
        for e in range(2):
            top = np.argsort(-gates[:, e], kind="stable")[:capacity]
            f = np.maximum(group[top] @ wi[e] + bi[e], 0) @ wo[e] + bo[e]
            expected[start + top] += gates[top, e : e + 1] * f
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_auxiliary_loss_and_statistics_count_every_group():
    router = routers.SoftmaxTokenChoiceRouter(
        4, num_selected_experts=1, capacity=2, noise_std=0.0, gshard_loss_weight=1.0
    )
    moe = make_moe(router)
    moe.track_statistics = "always"
    with moe.capture_routing() as routings:
        moe(X)  # 27 tokens: groups of 12, 12 and 3
    whole, partial = routings
    aux = np.concatenate([_np(whole.auxiliary_loss), _np(partial.auxiliary_loss)])
    assert aux.shape == (3,)
    assert float(_np(moe.losses[0])) == pytest.approx(aux.mean(), rel=1e-6)
    stats = moe.routing_statistics()
    w, p = whole.statistics(), partial.statistics()
    # Per token: 24 tokens of whole groups, 3 of the partial one.
    dropped = (24 * float(_np(w["fraction_tokens_dropped"]))) + 3 * float(
        _np(p["fraction_tokens_dropped"])
    )
    assert stats["fraction_tokens_dropped"] == pytest.approx(dropped / 27, rel=1e-6)
    # 4 experts x 2 slots: a whole group drops at least 12 - 8 = 4 tokens.
    assert stats["fraction_tokens_dropped"] >= 8 / 27
    # Per group: 2 whole groups and the partial one.
    load = (2 * _np(w["expert_load"]) + _np(p["expert_load"])) / 3
    assert stats["load_imbalance"] == pytest.approx(4 * load.max(), rel=1e-6)
    assert stats["auxiliary_loss"] == pytest.approx(aux.mean(), rel=1e-6)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.function with unknown batch"
)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_traced_call_with_unknown_batch_size(jit_compile):
    import tensorflow as tf

    moe = make_moe(routers.SoftmaxTokenChoiceRouter(4, seed=0))
    eager = {n: _np(moe(X[:n])) for n in (1, 7, 8, 9)}  # builds it, too
    traced = tf.function(
        lambda x: moe(x),
        input_signature=[tf.TensorSpec((None, T, D), tf.float32)],
        jit_compile=jit_compile,
    )
    for n in (1, 7, 8, 9):
        np.testing.assert_allclose(
            traced(X[:n]).numpy(), eager[n], atol=1e-5, err_msg=f"batch {n}"
        )


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    backbone = VisionMoEBackbone(**tiny_moe("softmax_token_choice", group_size=8))
    return VisionMoEImageClassifier(backbone, num_classes=3)


def test_classifier_and_backbone_take_any_batch_size(classifier):
    # Groups of 8 images; batches of 1, 7 and 9 (predict and eager calls).
    images = np.random.default_rng(2).uniform(size=(9, 16, 16, 3)).astype("float32")
    whole = _np(classifier(images[:8]))
    nine = classifier.predict(images, verbose=0)
    np.testing.assert_allclose(nine[:8], whole, atol=1e-5)
    alone = _np(classifier(images[8:]))
    np.testing.assert_allclose(nine[8:], alone, atol=1e-5)
    np.testing.assert_allclose(_np(classifier(images)), nine, atol=1e-5)
    seven = classifier.predict(images[:7], verbose=0)
    np.testing.assert_allclose(seven, _np(classifier(images[:7])), atol=1e-5)
    one = classifier.predict(images[8:], verbose=0)
    np.testing.assert_allclose(one, alone, atol=1e-5)
    pooled = _np(classifier.backbone(images)["pooled_output"])
    assert pooled.shape == (9, 16)
    np.testing.assert_allclose(
        pooled[8:], _np(classifier.backbone(images[8:])["pooled_output"]), atol=1e-5
    )
