"""Fixtures of the core tests."""

import pytest

from tests.conftest import data_of, tiny_with

SMALL_DATA = {"train_limit": 600}  # the method tests' data section: the tiny experiment's first 600 images


@pytest.fixture(scope="module")
def data():
    """(train, test, parts) of the tiny experiment with `SMALL_DATA`: what the method tests train on."""
    return data_of(tiny_with(data=SMALL_DATA))
