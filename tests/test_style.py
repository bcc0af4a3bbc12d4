"""Module sizes from the style guide, as a printed table and a warning: a module past 500 lines is worth a look
(is it still one concern?), but a concern is not split where a count runs out."""

import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minicpm4"
WARN_AT = 500


def test_module_sizes_are_reported():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes, f"no modules found under {PACKAGE}"
    for name, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}  {name}")
    for name, n in sizes.items():
        if n > WARN_AT:
            warnings.warn(f"minicpm4/{name} has {n} lines (> {WARN_AT}): is it still one concern?", stacklevel=1)
