"""Fixtures shared by the model tests."""

import numpy as np
import pytest


@pytest.fixture
def images():
    return np.random.RandomState(0).rand(4, 16, 16, 3).astype("float32")
