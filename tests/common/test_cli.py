"""common.cli.run_entry: bad input is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import pytest

from common.cli import USAGE_ERROR, run_entry
from common.errors import InputError


def test_input_error_becomes_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("TRACEBACK", raising=False)

    def main():
        raise InputError("cfg.yaml", "crop.sise", "a known key", "an unknown key")

    assert run_entry(main) == USAGE_ERROR == 2
    err = capsys.readouterr().err
    assert err == "error: cfg.yaml [crop.sise]: expected a known key, found an unknown key\n"


def test_success_returns_zero_or_the_int_result():
    assert run_entry(lambda: {"metrics": 1}) == 0
    assert run_entry(lambda: 3) == 3


def test_other_errors_are_not_swallowed():
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_entry(main)


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("TRACEBACK", "1")
    with pytest.raises(InputError):
        run_entry(lambda: (_ for _ in ()).throw(InputError(None, "k", "x")))
