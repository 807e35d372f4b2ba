"""The notebooks' exercises: every reference answer passes its check, wrong answers do not."""

from __future__ import annotations

import pytest
import torch

from pyrovae.teaching.solutions import EXERCISES, check


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_reference_answer_passes(name, monkeypatch):
    monkeypatch.setenv("PYROVAE_CHECK_SOLUTIONS", "1")
    assert check(name, EXERCISES[name].reference)


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_wrong_answer_fails(name, monkeypatch):
    ref = EXERCISES[name].reference

    def off_by_a_bit(*args):
        out = ref(*args)
        if isinstance(out, tuple):
            return tuple(o * 1.01 + 0.01 for o in out)
        return torch.as_tensor(out, dtype=torch.float64) * 1.01 + 0.01

    monkeypatch.delenv("PYROVAE_CHECK_SOLUTIONS", raising=False)
    assert not check(name, off_by_a_bit)
    monkeypatch.setenv("PYROVAE_CHECK_SOLUTIONS", "1")
    with pytest.raises(AssertionError):
        check(name, off_by_a_bit)


def test_unattempted_exercise(monkeypatch, capsys):
    def todo(*args):
        raise NotImplementedError

    monkeypatch.delenv("PYROVAE_CHECK_SOLUTIONS", raising=False)
    assert not check("4.1", todo)
    assert "not attempted" in capsys.readouterr().out
    monkeypatch.setenv("PYROVAE_CHECK_SOLUTIONS", "1")
    assert check("4.1", todo)  # the reference answer is checked in its place
