"""A node loads the compiled kernels before its round's clock starts (`kernels.load`):
their first use in a process is start-up, not the round's compute."""

import logging

import pytest

from fedprune import kernels


@pytest.fixture
def fresh_process_state(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", set())
    monkeypatch.setattr(kernels, "_availability", dict(kernels._availability))


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_loading_runs_what_a_round_will_use_once(fresh_process_state, monkeypatch):
    checked = []
    real = kernels._check_kernels
    monkeypatch.setattr(kernels, "_check_kernels", lambda *a: checked.append(1) or real(*a))
    kernels.load(sparse=False)  # masked dense: only the masked SGD update
    assert kernels._loaded == {"sgd"} and checked == []
    kernels.load(sparse=True)
    kernels.load(sparse=True)
    assert kernels._loaded == {"sgd", "sparse"} and checked == [1]
    assert kernels.available()


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_a_kernel_that_disagrees_when_loaded_turns_the_kernels_off_and_says_why(
    fresh_process_state, monkeypatch, caplog
):
    monkeypatch.setattr(kernels, "_check_kernels", lambda *a: "sparse convolution product")
    with caplog.at_level(logging.WARNING):
        kernels.load(sparse=True)
    assert not kernels.available()
    assert "sparse convolution product" in kernels.unavailable_reason()
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    assert "sparse" not in kernels._loaded


def test_nothing_loads_where_the_kernels_do_not_run(fresh_process_state, monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    kernels.load(sparse=True)
    assert kernels._loaded == set()
