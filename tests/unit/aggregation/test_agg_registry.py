import logging
import os

import numba
import pytest

from federated_learning.aggregation import RULES, configure_threads, create_strategy

NAMES = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedsgd",
    "perffedavg",
    "krum",
    "multikrum",
    "trimmed_mean",
    "median",
    "bulyan",
    "fedbuff",
]


def test_every_documented_rule_is_registered():
    assert sorted(RULES) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_rule_can_be_created_with_defaults(name):
    params = {"proximal_mu": 0.01} if name == "fedprox" else {}

    strategy = create_strategy(name, **params)

    assert strategy.name == name


def test_robust_rules_require_individual_updates():
    individual = {
        n
        for n in NAMES
        if create_strategy(
            n, **({"proximal_mu": 0.0} if n == "fedprox" else {})
        ).requires_individual_updates
    }

    assert individual == {"krum", "multikrum", "trimmed_mean", "median", "bulyan"}


def test_unknown_rule_is_rejected_with_the_known_names():
    with pytest.raises(
        ValueError, match="unknown aggregation rule 'fedavgx'; known: fedavg, fedprox"
    ):
        create_strategy("fedavgx")


def test_unknown_parameter_is_rejected_with_the_accepted_ones():
    with pytest.raises(
        ValueError, match="krum has no parameter 'f'; accepted: num_malicious_clients"
    ):
        create_strategy("krum", f=2)


def test_fedprox_requires_proximal_mu():
    with pytest.raises(ValueError, match="fedprox requires parameter 'proximal_mu'"):
        create_strategy("fedprox")


def test_fedprox_exposes_proximal_mu():
    assert create_strategy("fedprox", proximal_mu=0.1).proximal_mu == 0.1


def test_boolean_is_not_accepted_as_an_int():
    with pytest.raises(
        ValueError, match="krum num_malicious_clients must be an int >= 0; got True"
    ):
        create_strategy("krum", num_malicious_clients=True)


def test_configure_threads_rejects_zero():
    with pytest.raises(ValueError, match="thread count must be >= 1; got 0"):
        configure_threads(0)


def test_configure_threads_caps_at_the_pool_size_and_logs(caplog):
    before = numba.get_num_threads()
    available = numba.config.NUMBA_NUM_THREADS
    try:
        with caplog.at_level(logging.WARNING):
            used = configure_threads(available + 5)
        assert used == available
        assert numba.get_num_threads() == available
        assert f"only {available} available" in caplog.text
    finally:
        numba.set_num_threads(before)


def test_importing_the_package_sets_an_openmp_wait_policy():
    assert "OMP_WAIT_POLICY" in os.environ
