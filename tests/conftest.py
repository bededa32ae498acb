"""Fixtures shared by every test; the helpers themselves live in bn_testing.py."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
