"""The README's example runs, and CI runs exactly the README's test command."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_api_example_runs():
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", README, re.S).group(1)
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", str(ROOT / "README.md")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == block.strip() and "pytest" in extracted


def test_help_is_instant_without_frameworks():
    out = subprocess.run(["python", "-X", "importtime", "-m", "topkphi.cli", "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "chat" in out.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "mlx", "triton", "transformers"}
