"""Kernel tests (a package, so that its conftest is ``kernels.conftest`` and does not shadow
the top-level ``conftest`` module that tests/*.py import by name)."""
