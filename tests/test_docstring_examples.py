"""Every `Example:` in the core packages runs and prints what it shows.

(The models package has its own runner in tests/models/test_docstrings.py.)
"""

import doctest
import importlib

import pytest

MODULES = [
    "keras_vmoe.routers.allocation",
    "keras_vmoe.routers.base",
    "keras_vmoe.routers.capacity",
    "keras_vmoe.routers.registry",
    "keras_vmoe.routers.soft",
    "keras_vmoe.routers.softmax_expert_choice",
    "keras_vmoe.routers.softmax_token_choice",
    "keras_vmoe.routers.sinkhorn_token_choice",
    "keras_vmoe.routers.sinkhorn_expert_choice",
    "keras_vmoe.routers.sparsity_constrained_expert_choice",
    "keras_vmoe.layers.experts",
    "keras_vmoe.layers.moe",
    "keras_vmoe.training.schedules",
    "keras_vmoe.training.optimizer",
    "keras_vmoe.training.losses",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    tests = [t for t in finder.find(module, module_name) if t.examples]
    assert tests, f"{module_name} has no docstring example"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"
