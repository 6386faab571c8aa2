"""The project's packaging: every pipeline package imports and declares what it is for."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["tokenizer", "pretrain", "finetune", "serve", "tui"])
def test_package_imports_with_docstring(name):
    module = importlib.import_module(name)
    assert module.__doc__ and module.__doc__.strip()
