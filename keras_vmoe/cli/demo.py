"""Route and train a tiny MoE stack with every router, then print its routing."""

import time


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=30, help="Training steps.")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    from keras_vmoe.cli.errors import UsageError

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}.")
    import keras
    import numpy as np

    from keras_vmoe import routers
    from keras_vmoe.layers import MlpExperts, MoE

    rng = np.random.default_rng(args.seed)
    # 16 "images" of 16 tokens each; the class depends on the token contents.
    x = rng.normal(size=(256, 16, 32)).astype("float32")
    y = (x[:, :, :4].mean(axis=(1, 2)) > 0).astype("int32")
    print(f"backend: {keras.backend.backend()}")
    print(
        f"{'router':<36}{'loss':>14}{'dropped':>9}{'exp/tok':>9}{'imbal.':>8}{'s':>6}"
    )
    for name in routers.ROUTER_NAMES:
        try:
            router = routers.get(name, num_experts=8)
        except ImportError:
            continue  # not available in this version
        keras.utils.set_random_seed(args.seed)
        inputs = keras.Input((16, 32))
        moe = MoE(router, MlpExperts(8, 64), group_size=64, name="moe")
        h = keras.layers.LayerNormalization()(inputs)
        h = inputs + moe(h)
        h = keras.layers.GlobalAveragePooling1D()(h)
        model = keras.Model(inputs, keras.layers.Dense(2)(h))
        model.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        start = time.perf_counter()
        epochs = max(1, args.steps // 8)
        hist = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
        stats = moe.routing_statistics()
        loss = hist.history["loss"]
        print(
            f"{name:<36}{loss[0]:>6.3f}->{loss[-1]:<6.3f}"
            f"{stats['fraction_tokens_dropped']:>9.3f}"
            f"{stats['experts_per_token']:>9.2f}{stats['load_imbalance']:>8.2f}"
            f"{time.perf_counter() - start:>6.1f}"
        )
    return 0
