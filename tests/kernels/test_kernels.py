"""The kernel layer's contract: one accessor per csrc/*.cpp extension, and the layer kinds Python hands the C++
decode stack are the values csrc/layer_kind.h defines (read back from the built extension)."""

from pathlib import Path

import pytest

from minicpm4 import kernels
from minicpm4.kernels.build import CSRC


def test_one_accessor_per_extension_source():
    assert set(kernels.EXTENSIONS) == {p.stem for p in Path(CSRC).glob("*.cpp")}


def test_layer_kinds_match_the_cpp_enum():
    ext = kernels.decode()
    if ext is None:
        pytest.skip("the decode extension could not be built here (no C++ compiler or ninja)")
    assert ext.LAYER_KINDS == {k.name: int(k) for k in kernels.LayerKind}


def test_cpu_flags_name_the_instruction_sets():
    flags = kernels.cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    assert flags and all(f == f.strip() and f for f in flags)
    assert ("sse2" in flags) or ("asimd" in flags) or ("fp" in flags), sorted(flags)[:20]  # x86-64 or aarch64


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time
    import warnings

    from minicpm4.kernels.build import STALE_LOCK_S, remove_stale_lock
    lock = tmp_path / "lock"
    lock.touch()
    assert not remove_stale_lock(tmp_path) and lock.exists()  # a build in progress: wait for it
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert remove_stale_lock(tmp_path)
    assert not lock.exists() and "did not finish" in str(caught[0].message)
    assert not remove_stale_lock(tmp_path)  # nothing there
