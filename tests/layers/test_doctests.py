"""The examples in the layers' docstrings run."""
import doctest
import importlib

import pytest
import torch

MODULES = ["moemix.layers.sparse_moe", "moemix.layers.moe_layer", "moemix.layers.routed_experts"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
