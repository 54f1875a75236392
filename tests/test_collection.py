"""The suite's test ids are the same in every process: pytest-xdist (``make test-gpu``) refuses to run when
its workers collect different ids, as they did when a parametrization held ``gzip.compress`` output (its
header stamps the current second)."""

import subprocess
import sys
import time

from tests.repo_files import REPO_ROOT


def _ids() -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/data", "tests/eval"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_collected_ids_do_not_depend_on_the_clock():
    first = _ids()
    time.sleep(1.1)  # a new second: ids built from time-stamped bytes change
    second = _ids()
    assert len(first) > 50
    assert first == second, sorted(set(first) ^ set(second))[:5]
