"""Regenerates the preset folders next to this script.

    python presets/generate.py            # all presets
    python presets/generate.py NAME ...   # only these

Each folder gets `config.json` (backbone), `task.json` (classifier),
`preprocessor.json` and `image_converter.json` (the preprocessing) and
`metadata.json` (description, parameter count, FLOPs per image), computed
from the definitions in `keras_vmoe/models/vision_moe/presets.py` without building the
models. Edit the definitions there, not the JSON files.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vmoe.models.vision_moe import presets  # noqa: E402


def main(argv):
    out_dir = os.path.dirname(os.path.abspath(__file__))
    names = argv or None
    written = presets.generate_presets(out_dir, names=names)
    for name in written:
        print(name)
    print(f"{len(written)} presets written to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
