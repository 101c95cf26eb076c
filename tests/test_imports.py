"""Every module of the project imports (a renamed name in a benchmark or script fails here,
not when someone next runs it)."""

import importlib
import pkgutil

import pytest

PACKAGES = ("fedprune", "strategies", "clients", "experiments", "deploy")


def modules():
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.iter_modules(root.__path__, f"{package}."):
            yield info.name


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports(name):
    importlib.import_module(name)
