"""The benchmark scripts' table cells: mean ± the sample std (ddof 1) over seeds, as every other table
of the repository (fedhpc sweep, docs/results.md), checked against the standard library's formulas."""
import importlib.util
import statistics

import pytest

from conftest import REPO


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main(), does not run it
    return module


@pytest.mark.parametrize("name", ["fedhello", "faults_accuracy"])
def test_bench_cells_are_mean_and_sample_std(name):
    pm = _script(name).mean_std
    values = [0.61, 0.70, 0.64]
    assert pm(values) == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"  # 0.650 ± 0.046
    assert pm(values) != f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"  # not 0.037
    assert pm([0.5]) == "0.500" and pm([]) == "–" and pm([None, float("nan")]) == "–"
