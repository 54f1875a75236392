"""Session-wide test settings: the device of the kernel tests, and a guard on process-wide state.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter, which only takes effect
when ``TRITON_INTERPRET=1`` is set before ``triton`` is first imported: set it here, before any test
module imports a kernel. With CUDA nothing is set: the kernels compile for the GPU (``make test-gpu``).

Under pytest-xdist each worker takes its share of the cores as intra-op threads. The guard
(``tests/global_state.py``): a test module whose import changes the watched state is a
collection error, and a test that leaves it changed fails (in its teardown) and the state is put back.
"""

import os
import signal
import time

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, tests marked ``slow`` go first (a stable sort, the same in every worker, as xdist
    requires): started last, one of them would hold the whole run past its end (``make test-gpu``)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _live() -> bool:
    """``RATPLUS_LIVE_FAILURES=1`` (``make test-gpu`` sets it): report as the run goes, so that a run cut off
    by a time limit still says what failed and what was slow (pytest's own summary comes only at the end)."""
    return os.environ.get("RATPLUS_LIVE_FAILURES") == "1" and "PYTEST_XDIST_WORKER" not in os.environ


LIVE_SLOW_S = float(os.environ.get("RATPLUS_LIVE_SLOW_S", "30"))
"""A test (set-up, call and teardown) that takes longer is named as it ends (``LIVE-SLOW``)."""
_RUNNING: dict[str, float] = {}  # node id -> time.monotonic() at its start, in the controlling process


def pytest_configure(config: pytest.Config) -> None:
    """``SUITE_TIMEOUT`` interrupts the run with SIGINT. A shell that starts a command in the background starts it
    with SIGINT ignored, and Python leaves an ignored SIGINT ignored: take it back in the controlling process, so
    that the interrupt still ends the run with its summary (and ``timeout -k`` need not kill it)."""
    if _live() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Name each failure the moment it happens (``LIVE-FAILED``); print what a test recorded with pytest's
    ``record_property`` (``LIVE-PROPERTY``: e.g. the tiny reproduction's seconds per stage on the GPU machine)."""
    if not _live():
        return
    if report.failed:
        print(f"\nLIVE-FAILED {report.nodeid} ({report.when}): {_first_line(report)}", flush=True)
    if report.when == "call":
        for name, value in report.user_properties:
            print(f"\nLIVE-PROPERTY {report.nodeid} {name}: {value}", flush=True)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if _live():
        _RUNNING[nodeid] = time.monotonic()


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    started = _RUNNING.pop(nodeid, None)
    took = None if started is None else time.monotonic() - started
    if took is not None and took >= LIVE_SLOW_S:
        print(f"\nLIVE-SLOW {nodeid}: {took:.0f} s", flush=True)


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo) -> None:
    """Interrupted (``make test-gpu`` sends SIGINT at ``SUITE_TIMEOUT``): the tests still running, longest first."""
    now = time.monotonic()
    for nodeid, started in sorted(_RUNNING.items(), key=lambda item: item[1]):
        print(f"\nLIVE-RUNNING {nodeid}: {now - started:.0f} s when interrupted", flush=True)


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    return (crash.message if crash else str(report.longrepr)).splitlines()[0][:300] if report.longrepr else ""
