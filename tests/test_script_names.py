"""No script or test module is named like an installed module. Python puts a script's folder first
on sys.path (pytest puts tests/ there), so a library importing that name gets our file instead:
transformers 5.25 imports the PyPI package `kernels`, and bench/kernels.py (now bench/kernel_speed.py)
broke every bench script that loads peft; tests/kernels broke collection the same way."""
import json
import subprocess
import sys

from conftest import REPO

SCRIPT_FOLDERS = ("bench", "tools", "examples", "tests", "tests/mpi")


def _our_names() -> set[str]:
    names = {p.stem for folder in SCRIPT_FOLDERS for p in (REPO / folder).glob("*.py")}
    return names | {p.name for p in (REPO / "tests").iterdir() if p.is_dir()}


def test_no_script_or_test_module_shadows_an_installed_one(tmp_path):
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([n for n in json.loads(sys.argv[1]) if importlib.util.find_spec(n)]))")
    # -I: neither PYTHONPATH nor the working folder (an empty tmp_path) on sys.path: what is installed only
    done = subprocess.run([sys.executable, "-I", "-c", code, json.dumps(sorted(_our_names()))], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, check=True)
    assert json.loads(done.stdout) == [], "rename these: an installed module has the same name"


def test_the_lookup_finds_an_installed_module(tmp_path):
    """The same lookup finds a dependency, so the empty answer above means something."""
    code = "import importlib.util; print(importlib.util.find_spec('transformers') is not None)"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=True)
    assert done.stdout.strip() == "True"
