"""The declared reductions against a float64 loop, and the same result on 1 and 3 ranks."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import reduce_ranks  # noqa: E402


def test_group_means_and_gather_match_a_python_loop():
    out = reduce_ranks.main(MPI.COMM_SELF)
    ids = np.arange(reduce_ranks.NUM_CLIENTS)
    ref = reduce_ranks.contributions(ids)
    w = ref.weights.numpy()
    assert out["clients"] == ids.tolist() and out["gathered_weights"] == w.tolist()
    for key in reduce_ranks.SHAPES:
        rows = ref.tensors[key].double().numpy()
        np.testing.assert_array_equal(np.array(out["gathered"][key], dtype=np.float32), rows.astype(np.float32))
        for g in range(reduce_ranks.NUM_GROUPS):
            members = ids % reduce_ranks.NUM_GROUPS == g
            mean = np.tensordot(w[members], rows[members], axes=1) / w[members].sum()
            np.testing.assert_allclose(out["means"][key][g], mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ranks", [3])
def test_reduction_does_not_depend_on_the_rank_count(ranks):
    launcher = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    script = Path(__file__).parent / "mpi" / "reduce_ranks.py"
    done = subprocess.run([launcher, "-n", str(ranks), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)  # one copy per rank
    assert len(results) == ranks
    single = reduce_ranks.main(MPI.COMM_SELF)
    for result in results:
        assert result["clients"] == single["clients"] and result["gathered"] == single["gathered"]
        for key in single["means"]:
            np.testing.assert_allclose(result["means"][key], single["means"][key], rtol=1e-12)
