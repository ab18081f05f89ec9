"""The README's promises about the project itself."""

import re

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert quick_start[0] == "pip install -r requirements.txt"
    test_command = quick_start[2].split("&&")[-1].strip()
    assert test_command == "python -m pytest -q"
    assert test_command in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_requirements_admit_the_torch_build_ci_installs():
    requirements = (REPO / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(r"^torch>=2\.4$", requirements, re.M)
