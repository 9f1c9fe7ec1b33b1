"""Print the newest release of each package CI installs against the version CI tests (.ci/versions).

    python .ci/newest_releases.py

Reads the package registry through `pip index versions` (what pip itself would install here, constraints
included), so it needs the registry, nothing else.
"""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

VERSIONS = Path(__file__).with_name("versions")
# installed by setup.py's extras at whatever release pip resolves; CI tests the one installed
RESOLVED = ("accelerate", "datasets", "evaluate", "peft", "trl", "lm-eval", "huggingface_hub", "tokenizers")


def ci_versions() -> dict[str, str]:
    """{package: the newest version CI pins} from the last row of .ci/versions."""
    rows = [line.split() for line in VERSIONS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(zip(("torch", "transformers"), rows[-1], strict=True))


def newest(package: str) -> str:
    """The newest release pip can install here (respecting the machine's constraints), or why not."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True, timeout=120
    )
    found = re.search(r"^\S+ \(([^)]+)\)", out.stdout, re.M)
    return found.group(1) if found else f"unknown ({(out.stderr or out.stdout).strip().splitlines()[-1:]})"


def capped(package: str) -> str | None:
    """The machine's cap on a package from pip's constraints files (e.g. torch<=2.14.1 here), if any."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for path in re.findall(r"constraint='([^']+)'", listing):
        text = Path(path).read_text() if Path(path).is_file() else ""
        found = re.search(rf"^{re.escape(package)}\s*(<=?\s*[\w.]+)", text, re.M | re.I)
        if found:
            return found.group(1).replace(" ", "")
    return None


def installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    pinned = ci_versions()
    rows = [(name, pinned[name], newest(name)) for name in pinned]
    rows += [(name, f"{installed(name)} (installed)", newest(name)) for name in RESOLVED]
    width = max(len(name) for name, *_ in rows)
    print(f"{'package':<{width}}  {'CI tests':<24}  newest release")
    for name, tested, latest in rows:
        cap = capped(name)
        mark = "" if tested.split()[0] == latest else "  <- newer release"
        if mark and cap:
            mark += f" (this machine caps {name}{cap})"
        print(f"{name:<{width}}  {tested:<24}  {latest}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
