"""Size budgets from the style guide: model.py at most 500 lines, other modules at most 300."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minicpm4"
BUDGET = {"model.py": 500}


def test_module_sizes_within_budget():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    for name, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}  {name}")
    over = {name: n for name, n in sizes.items() if n > BUDGET.get(Path(name).name, 300)}
    assert not over, f"modules over their line budget: {over}"
