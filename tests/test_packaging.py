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


def test_ci_runs_the_suite_on_the_declared_transformers_floor():
    ci = (ROOT / ".ci" / "run").read_text()
    versions = re.search(r'TRANSFORMERS_VERSIONS="([^"]+)"', ci).group(1).split()
    floor = _requirements()["transformers"].removeprefix(">=")
    assert len(versions) >= 2
    assert versions[0].startswith(floor), (versions, floor)
    assert "python -m pytest -q" in ci  # the README's test command, run for every version
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q" in readme
