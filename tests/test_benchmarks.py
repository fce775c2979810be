"""Every benchmark script still imports against the library as it is now.

The scripts take minutes and are not run here; importing them catches what
a refactor of the library's private modules breaks (a script importing a
helper that was removed failed only when someone next ran it).
"""

import importlib
import os
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def test_scripts_found():
    assert {"uci_suite", "ablation", "compile_cost", "gain_ratio"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    # Some scripts extend XLA_FLAGS when imported; later subprocesses must not see that.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    module = importlib.import_module(name)
    assert callable(module.main)
