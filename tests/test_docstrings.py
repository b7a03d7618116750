"""The examples in the package's docstrings run and print what they show.

Examples that need a running cluster are marked ``# doctest: +SKIP`` and not run here
(the cluster behaviour they show is tested in test_resources.py and test_reliability.py).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dask_cosim

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(dask_cosim.__path__, "dask_cosim.")
    if info.name != "dask_cosim.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples in {name} failed (see output above)"
    )


def test_the_examples_are_found():
    finder = doctest.DocTestFinder()
    examples = sum(
        len(test.examples) for name in MODULES for test in finder.find(importlib.import_module(name))
    )
    assert examples >= 40, examples
