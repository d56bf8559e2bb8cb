"""Every module of `keras_vmoe` imports, and its docstring examples run.

The modules are found by walking the package (`pkgutil.walk_packages`), so
a new module is covered without being listed. A module without examples
only has to import. A module that cannot be imported on some backend, or
whose examples need a set-up or minutes of their own, goes in `SKIP` with
the reason.
"""

import doctest
import importlib
import os
import pkgutil

import keras
import pytest

import keras_vmoe

# module name -> (backends it is skipped on, reason). Empty while every
# module imports and runs its examples in a few seconds on every backend.
SKIP = {}
BACKENDS = ("jax", "tensorflow", "torch")


def walk_modules():
    """Names of the package and all its modules, sorted."""
    prefix = keras_vmoe.__name__ + "."
    found = pkgutil.walk_packages(keras_vmoe.__path__, prefix)
    return sorted([keras_vmoe.__name__] + [info.name for info in found])


MODULES = walk_modules()


def docstring_tests(module):
    """The doctests of the docstrings defined in `module` that have examples."""
    tests = doctest.DocTestFinder().find(module, module.__name__)
    return [test for test in tests if test.examples]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Examples write only under a temporary folder (cwd and TFDS data)."""
    import tensorflow_datasets as tfds

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "tfds"))


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name, scratch):
    backends, reason = SKIP.get(module_name, ((), ""))
    if keras.backend.backend() in backends:
        pytest.skip(reason)
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    for test in docstring_tests(module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"


def test_the_walk_finds_every_package_and_the_examples():
    packages = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    on_disk = {
        entry
        for entry in os.listdir(keras_vmoe.__path__[0])
        if os.path.exists(os.path.join(keras_vmoe.__path__[0], entry, "__init__.py"))
    }
    assert on_disk <= packages, on_disk - packages
    with_examples = [
        name for name in MODULES if docstring_tests(importlib.import_module(name))
    ]
    # 43 modules with 230 examples when this runner replaced two hand-written
    # module lists (25 modules, 120 examples); a drop means the walk broke.
    assert len(with_examples) >= 40, with_examples
    for name, (backends, reason) in SKIP.items():
        assert name in MODULES, f"SKIP names a module that does not exist: {name}"
        assert set(backends) <= set(BACKENDS) and reason, name


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
