"""Driving a command line with bad input: it must exit with status 2 and end its stderr with one
line ``prog: error: ...``, without a traceback."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def cli_error(
    capsys: pytest.CaptureFixture,
    main: Callable,
    argv: Sequence[str],
    contains: Sequence[str] = (),
    only_line: bool = True,
) -> str:
    """Run ``main(argv)``; return its error line, which holds every string of ``contains``.

    ``only_line``: stderr holds nothing else.
    """
    capsys.readouterr()  # drop what earlier calls printed
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ": error: " in lines[-1], err
    if only_line:
        assert len(lines) == 1, err
    for fragment in contains:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]
