"""A tiny model for the router's real worker processes."""

from __future__ import annotations

import pytest

from tests.factories import tiny_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("router-models"))
