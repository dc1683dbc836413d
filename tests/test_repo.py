"""README's two commands are what CI and a new user run."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "    bash scripts/test.sh\n" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "python -m bench_suite.run" in readme and "bash scripts/install.sh bench" in readme
    assert "pytest" in (ROOT / "scripts" / "test.sh").read_text()
