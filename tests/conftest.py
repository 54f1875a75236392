"""Session-wide test settings: the device of the kernel tests, and a guard on process-wide state.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter, which only takes effect
when ``TRITON_INTERPRET=1`` is set before ``triton`` is first imported: set it here, before any test
module imports a kernel. With CUDA nothing is set: the kernels compile for the GPU (``make test-gpu``).

Under pytest-xdist each worker takes its share of the cores as intra-op threads. The guard
(``tests/global_state.py``): a test module whose import changes the watched state is a
collection error, and a test that leaves it changed fails (in its teardown) and the state is put back.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers (``make test-gpu``: -n 8) share the cores: each takes its share of intra-op threads.
# torch's default, every core in every worker, oversubscribes them and OpenMP spin-waits (3-15x slower).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from tests import global_state  # noqa: E402
from tests.device import DEVICE  # noqa: E402  (imports triton: after TRITON_INTERPRET is set)

_AT_START = global_state.snapshot()


@pytest.fixture
def device() -> torch.device:
    """The device of the kernel tests: ``cuda`` (compiled kernels) when there is one, else ``cpu`` (interpreter)."""
    return torch.device(DEVICE)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Importing a test module must leave the watched state as it was (it would change every later module)."""
    outcome = yield
    if not isinstance(collector, pytest.Module):
        return
    changed = global_state.changes(_AT_START, global_state.snapshot())
    if changed:
        global_state.restore(_AT_START)
        report = outcome.get_result()
        report.outcome = "failed"
        report.longrepr = f"importing {collector.path} changed process-wide state: " + "; ".join(changed)


@pytest.fixture(autouse=True)
def _leaves_global_state_alone():
    """Fail a test that leaves torch's switches, the watched environment or kernel settings changed."""
    before = global_state.snapshot()
    yield
    changed = global_state.changes(before, global_state.snapshot())
    if changed:
        global_state.restore(before)
        pytest.fail(
            "the test left process-wide state changed (restore it, e.g. with monkeypatch): " + "; ".join(changed)
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """``RATPLUS_LIVE_FAILURES=1`` (``make test-gpu`` sets it): name each failure the moment it happens, so a
    run cut off by a time limit still says what failed (pytest's own summary comes only at the end)."""
    if os.environ.get("RATPLUS_LIVE_FAILURES") == "1" and report.failed:
        print(f"\nLIVE-FAILED {report.nodeid} ({report.when}): {_first_line(report)}", flush=True)


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    return (crash.message if crash else str(report.longrepr)).splitlines()[0][:300] if report.longrepr else ""
