"""The pixel range V-MoE models are trained in: [-1, 1].

Pixels 0..255 map to `x * PIXEL_SCALE + PIXEL_OFFSET`, i.e. `x / 127.5 - 1`
(the vmoe and big_vision input pipelines' `value_range(-1, 1)`). One
definition for every place that scales images: the `keras_vmoe.data`
pipelines and `load_arrays` call `scale_pixels`, and the model's
`VisionMoEImageConverter` is a keras-hub `ImageConverter` with
`scale=PIXEL_SCALE, offset=PIXEL_OFFSET`, which computes the same float32
product and sum (docs/architecture.md, "Preprocessing").
"""

import numpy as np

# 1 / 127.5 and -1: 0 -> -1, 127.5 -> 0, 255 -> 1.
PIXEL_SCALE = 1.0 / 127.5
PIXEL_OFFSET = -1.0


def scale_pixels(images):
    """Pixels 0..255 scaled to [-1, 1] in float32, as the model's converter does.

    Computes `float32(images) * float32(PIXEL_SCALE) + float32(PIXEL_OFFSET)`,
    the operations of keras-hub's `ImageConverter` with that scale and
    offset, so both round alike.

    Args:
        images: float32 NumPy array or tf.Tensor (cast before calling), or
            any array that multiplies with a NumPy float32 scalar.

    Returns:
        The scaled images, of the same type.

    Example:
    >>> scale_pixels(np.array([0.0, 127.5, 255.0], "float32")).tolist()
    [-1.0, 0.0, 1.0]
    """
    return images * np.float32(PIXEL_SCALE) + np.float32(PIXEL_OFFSET)
