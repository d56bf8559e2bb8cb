"""keras_vmoe: Vision Mixture of Experts for Keras 3.

`import keras_vmoe` is light: it imports neither Keras nor TensorFlow nor
keras-hub. Each subpackage loads on first use (`keras_vmoe.models`,
`from keras_vmoe import models`, `import keras_vmoe.routers`), and only
what it needs: `keras_vmoe.routers`, `keras_vmoe.layers` and
`keras_vmoe.ot` import Keras but neither TensorFlow nor keras-hub, under
every backend.

Keras serialization: a class registers itself (package "keras_vmoe") when
its module loads. Loading a subpackage registers everything its objects
need (`keras_vmoe.layers`: the MoE layer, its experts and every router;
`keras_vmoe.models`: the backbone, the classifier and all their layers).
So that keras-hub's own loaders (`keras_hub.models.ImageClassifier
.from_preset(path)`) find the V-MoE classes, importing this package also
loads `keras_vmoe.models` and `keras_vmoe.training` as soon as keras-hub
is imported (at once if it already is). To load a plain Keras model that
holds V-MoE layers without keras-hub, import `keras_vmoe.layers` first.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

# TensorFlow's C++ start-up chatter hides the useful output; keep a user's
# own setting if there is one.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
# Subpackages, loaded on first use by `__getattr__`.
__all__ = [
    "callbacks",
    "data",
    "distribution",
    "evaluation",
    "layers",
    "models",
    "ot",
    "routers",
    "training",
]
# What keras-hub's loaders need registered: every serializable class.
_REGISTERED_WITH_KERAS_HUB = ("keras_vmoe.models", "keras_vmoe.training")


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_for_keras_hub():
    for module in _REGISTERED_WITH_KERAS_HUB:
        importlib.import_module(module)


class _AfterKerasHubImport(importlib.abc.MetaPathFinder):
    """Runs `_register_for_keras_hub` once `keras_hub` has been imported.

    A one-shot import hook: it finds `keras_hub` with the other finders and
    wraps its loader so that, once the package has run, the keras_vmoe
    classes register. It then removes itself.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras_hub":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            # When keras_vmoe.models itself imports keras-hub, it is half
            # loaded now and finishes on its own.
            if "keras_vmoe.models" not in sys.modules:
                _register_for_keras_hub()

        spec.loader.exec_module = exec_then_register
        return spec


if "keras_hub" in sys.modules:
    _register_for_keras_hub()
else:
    sys.meta_path.insert(0, _AfterKerasHubImport())
