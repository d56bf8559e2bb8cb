"""Fixtures shared by the study tests."""

import pytest


@pytest.fixture
def built_models(monkeypatch):
    """The classifiers `runner.build_model` builds during the test, in order."""
    from keras_vmoe.study import runner

    built = []
    build_model = runner.build_model

    def recording_build_model(*args):
        built.append(build_model(*args))
        return built[-1]

    monkeypatch.setattr(runner, "build_model", recording_build_model)
    return built
