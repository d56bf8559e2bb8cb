"""Importing the light parts of the package loads neither TensorFlow nor keras-hub.

Each check runs in a fresh Python process (the test session has imported
everything already) and reads `sys.modules` there. The processes set their
own backend, so these tests run in the JAX session only.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="spawns its own jax and torch processes; once is enough",
)

HEAVY = ("tensorflow", "keras_hub")


def loaded_after(code, backend):
    """`{module: loaded}` for keras and `HEAVY` after running `code` afresh."""
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({m: m in sys.modules for m in "
        f"{('keras', *HEAVY)!r}}}))"
    )
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_routers_layers_and_ot_load_neither_tensorflow_nor_keras_hub(backend):
    loaded = loaded_after(
        "import keras_vmoe.routers, keras_vmoe.layers, keras_vmoe.ot\n"
        "from keras_vmoe.routers import SoftmaxTokenChoiceRouter\n"
        "from keras_vmoe.layers import MoE, MlpExperts\n"
        "MoE(SoftmaxTokenChoiceRouter(num_experts=2),"
        " MlpExperts(num_experts=2, hidden_dim=4), group_size=2)",
        backend,
    )
    assert loaded == {"keras": True, "tensorflow": False, "keras_hub": False}


def test_package_import_and_cli_help_and_presets_load_no_keras():
    code = (
        "import contextlib, io, keras_vmoe\n"
        "from keras_vmoe import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert cli.main(['presets']) == 0\n"
        "assert 'vmoe_softmax_tc_b16_e32_224' in out.getvalue()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    with contextlib.suppress(SystemExit):\n"
        "        cli.main(['--help'])\n"
    )
    loaded = loaded_after(code, "jax")
    assert loaded == {"keras": False, "tensorflow": False, "keras_hub": False}


def test_keras_hub_finds_the_vmoe_classes_after_a_light_import():
    # `import keras_vmoe` loads nothing heavy, yet keras-hub's loaders, which
    # look classes up by registered name, find them once keras-hub loads.
    loaded = loaded_after(
        "import keras_vmoe, keras_hub, keras\n"
        "for name in ('VisionMoEBackbone', 'VisionMoEImageClassifier', 'MoE',"
        " 'SoftmaxCrossEntropy'):\n"
        "    assert keras.saving.get_registered_object('keras_vmoe>' + name), name",
        "jax",
    )
    assert loaded["keras_hub"]


def test_only_the_running_command_is_imported():
    from keras_vmoe import cli

    code = (
        "import contextlib, io, sys\n"
        "from keras_vmoe import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['presets', '--filter', 'soft_moe'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('keras_vmoe.cli.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    imported = eval(result.stdout.strip().splitlines()[-1])
    commands = {m for m in imported if m in cli._COMMANDS.values()}
    assert commands == {"keras_vmoe.cli.presets"}
