import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# every command a user or a re-run of the lab starts from the shell; argparse formats help only on `--help`,
# so a stray `%` in a help text breaks it with a TypeError that no other test reaches
COMMANDS = sorted(
    str(path.relative_to(REPO))
    for folder in ("scripts", "benchmarks")
    for path in (REPO / folder).glob("*.py")
    if "__main__" in path.read_text()
)

HELP_EACH = """
import contextlib, io, os, runpy, sys
sys.path.insert(0, "")
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path[0] = os.path.abspath(os.path.dirname(path))  # as `python PATH` sets it
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None) or "usage:" not in out.getvalue():
            failed.append(f"{path}: exit {exit.code}")
    except Exception as error:
        failed.append(f"{path}: {type(error).__name__}: {error}")
    else:
        failed.append(f"{path}: ran instead of printing its help")
print("\\n".join(failed))
"""


def test_every_command_prints_its_help():
    assert len(COMMANDS) >= 10, COMMANDS
    done = subprocess.run(
        [sys.executable, "-c", HELP_EACH, *COMMANDS], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout
