"""Every `Example:` in the models package runs and prints what it shows."""

import doctest
import importlib

import pytest

MODULES = [
    "keras_vmoe.models",
    "keras_vmoe.models.atomic",
    "keras_vmoe.models.cost",
    "keras_vmoe.models.encoder_block",
    "keras_vmoe.models.losses",
    "keras_vmoe.models.preset_loader",
    "keras_vmoe.models.presets",
    "keras_vmoe.models.vit_layers",
    "keras_vmoe.models.vmoe_backbone",
    "keras_vmoe.models.vmoe_image_classifier",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    tests = [t for t in finder.find(module, module_name) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"


def test_public_docstrings_have_args_and_examples():
    from keras_vmoe import models

    for name in ("VisionMoEBackbone", "VisionMoEImageClassifier"):
        doc = getattr(models, name).__doc__
        assert "Args:" in doc and "Example:" in doc, name
    for name in (
        "from_preset",
        "list_presets",
        "parse_moe_layers",
        "count_backbone_params",
    ):
        assert "Example:" in getattr(models, name).__doc__, name
