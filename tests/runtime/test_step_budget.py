"""The step's token budget has one rule, in one place, whichever layer is given it."""

from __future__ import annotations

import pytest

from autocontrast.errors import ConfigurationError
from autocontrast.runtime.step_plan import step_budget_problem


@pytest.mark.parametrize("value", [None, 1, 32, 4096])
def test_a_positive_integer_or_none_is_a_budget(value):
    assert step_budget_problem(value) is None


@pytest.mark.parametrize("value", [0, -1, 1.5, "8", True])
def test_anything_else_is_named_with_the_rule(value):
    assert step_budget_problem(value) == (f"max_step_tokens ({value!r}) must be a positive integer or None "
                                          "(whole prompts)")


def test_the_server_configuration_and_the_scheduler_refuse_with_that_rule(llama_generator):
    from autocontrast.serve.app import ServerConfig
    from autocontrast.serve.scheduler import Scheduler

    with pytest.raises(ConfigurationError, match=r"max_step_tokens \(0\) must be a positive integer"):
        ServerConfig("tiny", max_step_tokens=0)
    with pytest.raises(ValueError, match=r"max_step_tokens \(-3\) must be a positive integer"):
        Scheduler(llama_generator, max_step_tokens=-3)
