"""tests/conftest.py's live reports (``make test-gpu``): failures, slow tests and recorded properties as they end, and
the tests still running named when the run is interrupted at ``SUITE_TIMEOUT``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.repo_files import pythonpath_with_checkout


def pytest_env(**extra: str) -> dict[str, str]:
    """The environment of a child pytest run: this one's, outside any xdist worker of ours, with the checkout
    importable (``-p tests.conftest``) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return {**env, "PYTHONPATH": pythonpath_with_checkout(), **extra}


def test_failures_slow_tests_and_the_tests_running_at_an_interrupt_are_named(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_cases.py").write_text(
        "import time\n"
        "def test_fails():\n    assert 1 == 2, 'one is not two'\n"
        "def test_slow(record_property):\n    time.sleep(2.5)\n    record_property('stage_s', {'data_s': 1})\n"
        "def test_hangs():\n    time.sleep(600)\n"
    )
    env = pytest_env(RATPLUS_LIVE_FAILURES="1", RATPLUS_LIVE_SLOW_S="2")
    # started with SIGINT ignored, as a shell starts a background job: the conftest must take SIGINT back
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", "-n", "3",
         "--rootdir", str(tmp_path), str(tmp_path / "test_cases.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        output, deadline = "", time.monotonic() + 240
        while "LIVE-SLOW" not in output and time.monotonic() < deadline:  # the slow test has ended: interrupt
            output += run.stdout.readline()
        run.send_signal(signal.SIGINT)  # as SUITE_TIMEOUT does; started in the background, SIGINT was ignored
        output += run.communicate(timeout=120)[0]
    finally:
        run.kill()  # a run the interrupt did not end
    lines = output.splitlines()
    assert "LIVE-FAILED test_cases.py::test_fails (call): AssertionError: one is not two" in lines, output
    assert any(line.startswith("LIVE-SLOW test_cases.py::test_slow: ") for line in lines), output
    assert "LIVE-PROPERTY test_cases.py::test_slow stage_s: {'data_s': 1}" in lines, output
    running = [line for line in lines if line.startswith("LIVE-RUNNING ")]
    assert len(running) == 1 and running[0].startswith("LIVE-RUNNING test_cases.py::test_hangs: "), output
    assert not any("test_fails:" in line or "test_slow:" in line for line in running)


def test_slow_tests_are_collected_first_under_xdist_only(tmp_path):
    (tmp_path / "test_order.py").write_text(
        "import pytest\n"
        "def test_a():\n    pass\n"
        "@pytest.mark.slow\ndef test_b():\n    pass\n"
        "def test_c():\n    pass\n"
        "@pytest.mark.slow\ndef test_d():\n    pass\n"
    )

    def collected(worker: str | None) -> list[str]:
        env = pytest_env(**({"PYTEST_XDIST_WORKER": worker} if worker else {}))
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "tests.conftest", "-p", "no:cacheprovider",
             "--rootdir", str(tmp_path), "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path / "test_order.py")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return [line.split("::")[1] for line in run.stdout.splitlines() if "::" in line]

    assert collected(None) == ["test_a", "test_b", "test_c", "test_d"]
    assert collected("gw0") == ["test_b", "test_d", "test_a", "test_c"]
