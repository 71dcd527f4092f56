"""The examples in the public docstrings run."""
import doctest
import importlib

import pytest

MODULES = ["moemix.mix.mixup_cutmix", "moemix.mix.patchmix", "moemix.mix.samplers.return_weighted"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
