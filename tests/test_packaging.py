"""What the package declares: tested lower bounds and no upper bounds, and CI running the declared floor."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requirements():
    text = (ROOT / "setup.py").read_text()
    block = text[text.index("install_requires=[") : text.index("],", text.index("install_requires=["))]
    return dict(re.findall(r'"([A-Za-z_\-]+)([^"]*)"', block))


def test_runtime_requirements_have_lower_bounds_and_no_upper_bounds():
    """Installing the package never downgrades a newer torch or transformers a user already has."""
    requirements = _requirements()
    assert {"torch", "transformers"} <= set(requirements)
    for name, spec in requirements.items():
        assert spec.startswith(">="), (name, spec)
        assert "<" not in spec and "==" not in spec, (name, spec)


def test_ci_runs_the_suite_on_the_declared_floor_and_a_newer_release():
    """The first row of .ci/versions is setup.py's floor of torch and transformers; a later row is newer."""
    ci = (ROOT / ".ci" / "run").read_text()
    lines = (ROOT / ".ci" / "versions").read_text().splitlines()
    rows = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    requirements = _requirements()
    assert len(rows) >= 2 and all(len(row) == 2 for row in rows), rows
    for column, name in enumerate(("torch", "transformers")):
        floor = requirements[name].removeprefix(">=")
        assert rows[0][column].startswith(floor), (name, rows[0], floor)
        newest = tuple(int(part) for part in rows[-1][column].split("."))
        assert newest > tuple(int(part) for part in rows[0][column].split(".")), (name, rows)
    assert ".ci/versions" in ci and "python -m pytest -q" in ci  # the README's test command, run for every version
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q" in readme
