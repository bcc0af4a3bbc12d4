"""The kernel layer's contract: one module per instruction-set tier, chosen from the CPU's features or forced
lower with MINICPM4_ISA; the layer kinds Python hands the C++ decode stack are the values csrc/layer_kind.h
defines (read back from the built module)."""

from pathlib import Path

import pytest

from minicpm4 import kernels
from minicpm4.errors import MiniCPM4Error
from minicpm4.kernels import isa


def test_every_tier_the_cpu_runs_builds_and_names_itself(tier):
    ext = kernels.native()
    assert ext.ISA == tier
    assert set(ext.PATHS) == {"int4 GEMM", "int8 GEMM", "ternary GEMV", "InfLLM v2 / dense attention"}


def test_layer_kinds_match_the_cpp_enum(tier):
    assert kernels.native().LAYER_KINDS == {k.name: int(k) for k in kernels.LayerKind}


def test_the_best_tier_is_selected_unless_one_is_forced(monkeypatch):
    monkeypatch.delenv("MINICPM4_ISA", raising=False)
    assert isa.selected() == isa.best()
    if not isa.supported():
        pytest.skip(f"{isa.machine()} has no kernel tiers")
    lowest = isa.supported()[0]
    monkeypatch.setenv("MINICPM4_ISA", lowest)
    assert isa.selected() == lowest


def test_a_tier_that_is_unknown_or_beyond_the_cpu_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("MINICPM4_ISA", "avx1024")
    with pytest.raises(MiniCPM4Error, match="MINICPM4_ISA='avx1024' is not a kernel variant"):
        isa.selected()
    beyond = [t for t in isa.table() if t not in isa.supported()]
    if not beyond:
        pytest.skip("this CPU runs every tier of its architecture")
    monkeypatch.setenv("MINICPM4_ISA", beyond[0])
    with pytest.raises(MiniCPM4Error, match="this CPU lacks"):
        isa.selected()


def test_tiers_follow_the_cpu_flags(monkeypatch):
    isa.cpu_flags.cache_clear()
    try:
        monkeypatch.setattr(isa, "machine", lambda: "x86_64")
        monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma", "f16c", "avx512f"}))
        assert isa.supported() == ["scalar", "avx2"]  # AVX-512 without BW/VL/DQ/VNNI runs the avx2 tier
        monkeypatch.setattr(isa, "machine", lambda: "aarch64")
        monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"fp", "asimd", "asimddp"}))
        assert isa.supported() == ["neon", "neon_dotprod"]
    finally:
        monkeypatch.undo()
        isa.cpu_flags.cache_clear()


def test_cpu_flags_name_the_instruction_sets():
    flags = kernels.cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    assert flags and all(f == f.strip() and f for f in flags)
    assert ("sse2" in flags) or ("asimd" in flags) or ("fp" in flags), sorted(flags)[:20]  # x86-64 or aarch64


def test_the_system_report_names_cpu_tiers_and_paths(tier):
    lines = isa.report(kernels.native())
    assert lines[0].startswith("cpu: ") and f"selected tier: {tier}" in "\n".join(lines)
    assert any(line.strip().startswith("int4 GEMM: ") for line in lines)


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


def test_a_missing_header_warns_and_falls_back(monkeypatch, tmp_path):
    import shutil
    import warnings

    from minicpm4.kernels import build
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    (csrc / "int4_gemm.h").unlink()  # as in a wheel that left the headers out
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setenv("MINICPM4_NATIVE_CACHE", str(tmp_path / "cache"))
    build._build.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert build.native() is None
        assert len(caught) == 1 and "unavailable" in str(caught[0].message), [str(w.message) for w in caught]
    finally:
        build._build.cache_clear()
