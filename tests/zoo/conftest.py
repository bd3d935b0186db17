"""Fixtures shared by the zoo tests."""

from __future__ import annotations

import pytest

from hyperforget.zoo import kernels as kernels_module


@pytest.fixture(params=["kernels", "torch-ops"])
def kernels(request, monkeypatch):
    """Run a test with the C kernels and again with the torch-op fallback (same maths)."""
    if request.param == "torch-ops":
        monkeypatch.setattr(kernels_module, "compiled_kernels", lambda: None)
    elif kernels_module.compiled_kernels() is None:
        pytest.skip("no C compiler: the kernels cannot be built here")
    return request.param == "kernels"
