"""The README's Python examples run as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_blocks_run():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no Python example"
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    outputs = namespace["outputs"]
    assert tuple(outputs.shape) == (4, 16, 32)
    combine = namespace["routing"].combine_tensor()
    from keras import ops

    # Token 1 (gate 0.7 for expert 0) is dropped: expert 0's one slot went to
    # token 0. Token 2 takes expert 1 with its gate 0.8.
    assert ops.convert_to_numpy(combine[0, :, :, 0]).tolist() == [
        [0.6000000238418579, 0.0],
        [0.0, 0.0],
        [0.0, 0.800000011920929],
    ]


def test_readme_quick_start_commands_exist():
    text = open(os.path.join(ROOT, "README.md")).read()
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    for target in ("demo", "test"):
        assert f"make {target}" in text
        assert re.search(rf"^{target}:", makefile, flags=re.M)
