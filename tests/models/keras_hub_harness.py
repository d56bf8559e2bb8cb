"""keras-hub's model test harness (`keras_hub/src/tests/test_case.py`).

`TestCase` is keras-hub's own base class, with `run_task_test`,
`run_model_saving_test`, `run_preset_test` and `run_serialization_test`, as
keras-hub runs them on its ViT (`keras_hub/src/models/vit/*_test.py`).

keras-hub's `test_case.py` imports `grain` at module level, so the test
extras pin it (pyproject.toml).
"""

from keras_hub.src.tests import test_case


class TestCase(test_case.TestCase):
    """keras-hub's `TestCase`."""

    # tf.test.TestCase's deprecated `test_session` helper is no test: hide
    # it from pytest, which would list it as skipped.
    test_session = None
