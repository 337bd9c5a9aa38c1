"""The README quick start and the docstring examples run as written (so they cannot rot)."""

import doctest
from pathlib import Path


def test_readme_quick_start():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    result = doctest.testfile(str(readme), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5
    assert result.failed == 0


def test_docstring_examples_of_the_core_modules():
    import segnn_jax.graph
    import segnn_jax.irreps
    import segnn_jax.layers
    import segnn_jax.segnn

    for module in (segnn_jax.irreps, segnn_jax.layers, segnn_jax.graph, segnn_jax.segnn):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        assert result.attempted > 0, module.__name__
