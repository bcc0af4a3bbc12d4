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
