"""The study's training augmentation: random flips and small shifts.

Keras preprocessing layers (`RandomFlip`, `RandomTranslation`) applied to
each training batch inside the `tf.data` pipeline, so they run on the CPU
alongside training whatever the backend. Each image gets its own random
flip and shift; test images and few-shot features are never augmented.
"""

import keras


class Augmentation:
    """Applies Keras preprocessing layers in turn, in or out of `tf.data`.

    Each layer is called on its own: a Keras preprocessing layer switches to
    TensorFlow ops inside a `tf.data` pipeline, a `keras.Sequential` of
    them does not (it converts its input for the backend).

    Args:
        layers: list of Keras preprocessing layers.
    """

    def __init__(self, layers):
        self.layers = list(layers)

    def __call__(self, images, training=True):
        for layer in self.layers:
            images = layer(images, training=training)
        return images


def augmentation(image_size, max_shift, seed):
    """The study's random flips and shifts, as an `Augmentation`.

    Args:
        image_size: int. Side of the (square) images.
        max_shift: int. Largest shift in pixels along each axis (`0`: flips
            only). Shifts are whole pixels (nearest-neighbour sampling);
            uncovered pixels repeat the nearest edge pixel.
        seed: int. Seeds the random draws.

    Returns:
        `Augmentation`: call it on a batch `(B, H, W, C)`.

    Example:
    >>> import numpy as np
    >>> layer = augmentation(image_size=4, max_shift=0, seed=0)
    >>> images = np.arange(2 * 16, dtype="float32").reshape(2, 4, 4, 1)
    >>> out = np.asarray(layer(images, training=True))
    >>> # Each image is either itself or its mirror image.
    >>> [bool((o == i).all() or (o == i[:, ::-1]).all()) for o, i in zip(out, images)]
    [True, True]
    """
    layers = [keras.layers.RandomFlip("horizontal", seed=seed)]
    if max_shift:
        factor = max_shift / image_size
        layers.append(
            keras.layers.RandomTranslation(
                factor,
                factor,
                fill_mode="nearest",
                interpolation="nearest",
                seed=seed + 1,
            )
        )
    return Augmentation(layers)
