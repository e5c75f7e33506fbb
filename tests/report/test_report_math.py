"""The report's statistics against values computed by hand."""

import numpy as np
import pytest

from dpo4rec.stats import paired_bootstrap
from dpo4rec.report.report import select_round


def test_paired_bootstrap_resamples_users_and_averages_over_lists():
    # user 0 has one list (diff 0.1), user 1 three lists (0.2 each), user 2 one list (0.3)
    users = np.array([0, 1, 1, 1, 2])
    a = np.array([0.6, 0.7, 0.7, 0.7, 0.8])
    b = np.full(5, 0.5)
    point, (low, high) = paired_bootstrap(users, a, b, n_boot=4000, seed=0)
    assert point == pytest.approx(0.2)  # mean over the 5 lists: (0.1 + 3 x 0.2 + 0.3) / 5
    # a resample of 3 users is all user 0 with probability 1/27 = 3.7% > 2.5% (all user 2 likewise),
    # so the 95% interval reaches exactly the extremes; resampling lists instead would not (1/5^5)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.3)


def test_paired_bootstrap_weights_a_user_by_their_lists():
    # user 0: two lists of diff 1; user 1: one list of diff 0. Over lists 2/3; a mean of user means would be 1/2
    point, (low, high) = paired_bootstrap(np.array([0, 0, 1]), np.array([1.0, 1.0, 0.0]), np.zeros(3), seed=1)
    assert point == pytest.approx(2 / 3)
    assert (low, high) == (0.0, 1.0)  # both users drawn as user 1 (1/4) or as user 0 (1/4)


def test_paired_bootstrap_of_equal_arms_is_exactly_zero():
    users = np.repeat(np.arange(5), 3)
    values = np.linspace(0, 1, 15)
    assert paired_bootstrap(users, values, values) == (0.0, (0.0, 0.0))


@pytest.mark.parametrize("validation, expected", [
    ({"base_llm": 0.50, "dpo_round_1": 0.52, "dpo_round_2": 0.51}, 1),
    ({"base_llm": 0.53, "dpo_round_1": 0.52, "dpo_round_2": 0.51}, 0),  # no DPO round beats the base: say so
    ({"base_llm": 0.50, "dpo_round_1": 0.52, "dpo_round_2": 0.52}, 1),  # a tie goes to fewer DPO rounds
    ({"dpo_round_2": 0.6, "base_llm": 0.6, "dpo_round_1": 0.5}, 0),  # whatever the order of the table
    ({"base_llm": 0.4, "dpo_round_10": 0.41, "dpo_round_9": 0.405}, 10),
])
def test_the_round_is_selected_on_validation_map(validation, expected):
    assert select_round(validation) == expected
