"""The wheel holds the whole package: every module, the C++ kernel sources that kernels/build.py compiles on the
user's machine (csrc/ops.cpp and every header it includes), and the page the server serves. A file missing from
the wheel would only show on a user's machine, as a warning and the slower PyTorch path (kernels) or a 404 (page).

The wheel is built offline, from a copy of the package (the worktree gets no build/ folder), by the venv's own
setuptools (--no-build-isolation: nothing is downloaded): ~5 s."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minicpm4.kernels import build

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "minicpm4"


def package_files() -> set[str]:
    """Every file of the source package, as the wheel names it (compiled caches aside)."""
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "minicpm4", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list(out.glob("minicpm4-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_holds_every_package_file_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = package_files()
    csrc = {f for f in files if f.startswith("minicpm4/kernels/csrc/")}
    static = {f for f in files if f.startswith("minicpm4/serve/static/")}
    assert "minicpm4/kernels/csrc/ops.cpp" in csrc and len(csrc) > 2 and "minicpm4/serve/static/chat.html" in static
    assert not csrc - names, f"kernel sources missing from the wheel: {sorted(csrc - names)}"
    assert not static - names, f"served files missing from the wheel: {sorted(static - names)}"
    assert not files - names, f"package files missing from the wheel: {sorted(files - names)}"
    extra = {n for n in names if not n.startswith("minicpm4/") and ".dist-info/" not in n}
    assert not extra, f"the wheel holds files outside the package: {sorted(extra)}"


def test_the_wheel_declares_the_console_script_and_the_torch_range(wheel):
    z = zipfile.ZipFile(wheel)
    info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    assert "minicpm4 = minicpm4.cli:main" in z.read(f"{info}/entry_points.txt").decode()
    metadata = z.read(f"{info}/METADATA").decode().splitlines()
    requires = [line for line in metadata if line.startswith("Requires-Dist: torch")]
    assert requires == ["Requires-Dist: torch>=2.6"], requires  # the 2.13.0 pin lives in constraints.txt


def test_the_installed_kernels_compile_the_same_sources(wheel, tmp_path):
    """Installed from the wheel, kernels/build.py reads its csrc/ from the install and hashes the same inputs as the
    source tree, so the build (and its cache key) is the one the tests check on every tier."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import hashlib, minicpm4.kernels.build as b; "
            "print(b.CSRC); print(hashlib.sha256(b.sources()).hexdigest())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    csrc, digest = r.stdout.split()
    assert Path(csrc) == site / "minicpm4" / "kernels" / "csrc"
    assert digest == hashlib.sha256(build.sources()).hexdigest()


def test_prebuilt_modules_load_instead_of_a_build(monkeypatch, tmp_path):
    """MINICPM4_NATIVE_PREBUILT=DIR (scripts/test_aarch64.sh, prebuilt wheels): native() imports
    DIR/minicpm4_native_<tier>.so and never compiles; a tier missing there or a file that does not load warns and
    gives the PyTorch path."""
    import warnings

    from minicpm4 import kernels
    if kernels.native() is None:
        pytest.skip("the native kernels could not be built here (no C++ compiler or ninja; see the warning)")
    # the module a fresh process builds (cached); in this process, after a rebuild, torch names it ..._<tier>_v1
    code = "from minicpm4 import kernels; m = kernels.native(); print(m.__file__, m.ISA)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    built, tier = r.stdout.split()
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    shutil.copy(built, prebuilt / f"minicpm4_native_{tier}.so")
    # in another fresh process (one process holds one module of a name), with no compiler and an empty build cache
    code = ("import torch, warnings; warnings.simplefilter('error'); from minicpm4 import kernels; "
            "ext = kernels.native(); "
            "x = torch.ones(2, 64, dtype=torch.bfloat16); w = torch.ones(32, 64, dtype=torch.int8); "
            "print(ext.__file__, ext.ISA, ext.int8_mm(x, w, torch.ones(32, dtype=torch.bfloat16)).unique().item())")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MINICPM4_NATIVE_PREBUILT": str(prebuilt),
           "MINICPM4_NATIVE_CACHE": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-compiler"), "MINICPM4_ISA": tier}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(prebuilt / f"minicpm4_native_{tier}.so"), tier, "64.0"]
    assert not (tmp_path / "cache").exists()
    (prebuilt / f"minicpm4_native_{tier}.so").write_bytes(b"not a shared object")
    monkeypatch.setattr(build, "_build", lambda tier: pytest.fail("compiled although prebuilt modules were named"))
    try:
        for directory, why in ((tmp_path, "has no"), (prebuilt, "does not load")):
            monkeypatch.setenv("MINICPM4_NATIVE_PREBUILT", str(directory))
            build._load_prebuilt.cache_clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert kernels.native() is None
            assert len(caught) == 1 and why in str(caught[0].message), [str(w.message) for w in caught]
    finally:
        build._load_prebuilt.cache_clear()
