"""Search spaces that live with each algorithm (pfedla_jax/algorithms/search_space.py).

Every registered algorithm's space fits its own default config and the presets' CPU budget
(every end of every range, the others at their defaults), each range names its source; a
space that does not fit is refused naming the hyperparameter; the flags a trial gets
(`override_flags`) build the same config as `apply_overrides`; `suggest` draws through an
Optuna trial. All in process, no training.
"""

import optuna
import pytest

from experiments import table
from pfedla_jax.algorithms import algorithm_class, algorithm_names
from pfedla_jax.algorithms.search_space import (CLIENT_LR, Choice, ConfigBound, Hyperparameter, IntRange,
                                                LogUniform, Uniform, check_search_space, override_flags,
                                                override_key, resolve_space, search_space, suggest)
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import apply_overrides


def _config(*argv):
    return config_from_argv(["experiments.run", *argv]).config


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_space_fits_its_default_config_and_names_sources(name):
    space = search_space(name)
    assert space and all(isinstance(h, Hyperparameter) for h in space)
    assert all(h.source for h in space), [h.path for h in space if not h.source]
    assert any(h.path == "train.lr" for h in space)  # the client lr, for every method
    check_search_space(_config(f"--algorithm={name}"))


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_space_fits_the_small_fmnist_preset_at_the_cpu_budget(name):
    preset = table.read_preset(table.resolve_preset("table1_fmnist_n10_small"))
    config = _config(f"--flagfile={preset.path}", *preset.cpu_budget, f"--algorithm={name}")
    check_search_space(config)


def test_the_paper_defaults_lie_inside_the_ranges():
    def rng(name, path):
        return next(h for h in search_space(name) if h.path == path)
    assert CLIENT_LR.low <= 0.005 <= CLIENT_LR.high and CLIENT_LR.low <= 0.05 <= CLIENT_LR.high
    assert rng("perfedavg", "beta").low <= 1e-3 <= rng("perfedavg", "beta").high
    assert rng("pfedme", "lam").low <= 15 <= rng("pfedme", "lam").high
    assert rng("pfedme", "personal_lr").low <= 0.09 <= rng("pfedme", "personal_lr").high
    assert rng("pfedme", "inner_steps").low <= 5 <= rng("pfedme", "inner_steps").high
    assert rng("pfedhn", "hn_lr").low <= 1e-2 <= rng("pfedhn", "hn_lr").high
    assert rng("pfedla", "hn_lr").low <= 0.005 and 0.1 <= rng("pfedla", "hn_lr").high
    assert rng("pfedla", "hn_optimizer").choices == ("sgd", "adam")


def test_pfedme_every_combination_of_range_ends_is_valid():
    """pFedMe refuses lr * lam >= 2 and personal_lr * lam >= 2: its ranges keep every point valid."""
    space = search_space("pfedme")
    base = _config("--algorithm=pfedme")
    corners = [{}]
    for h in space:
        corners = [{**c, override_key("pfedme", h.path): v} for c in corners for v in h.values_to_check()]
    for corner in corners:
        apply_overrides(base, corner)


def test_config_bounds_follow_the_experiment():
    fedrep = {h.path: h for h in resolve_space(_config("--algorithm=fedrep", "--local_epochs=5"))}
    assert (fedrep["body_epochs"].low, fedrep["body_epochs"].high) == (1, 4)
    assert {h.path: h for h in resolve_space(_config("--algorithm=fedrep"))}["body_epochs"].high == 1
    fomo = {h.path: h for h in resolve_space(_config("--algorithm=fedfomo", "--num_clients=4"))}
    assert fomo["num_candidates"].high == 3
    unresolved = next(h for h in search_space("fedrep") if h.path == "body_epochs")
    assert unresolved.describe() == "body_epochs ~ int uniform [1, local_epochs - 1]"
    with pytest.raises(ValueError, match="resolve"):
        unresolved.values_to_check()
    with pytest.raises(ValueError, match="resolve"):
        suggest(optuna.trial.FixedTrial({"fedrep.body_epochs": 1}), "fedrep", [unresolved])
    empty = IntRange("body_epochs", 3, ConfigBound("two", lambda c: 2))
    with pytest.raises(UserInputError, match="body_epochs"):
        resolve_space(_config("--algorithm=fedrep"), [empty])


def test_a_space_that_does_not_fit_is_refused_naming_the_hyperparameter():
    config = _config("--algorithm=pfedme")
    with pytest.raises(UserInputError, match="nope"):
        check_search_space(config, [LogUniform("nope", 0.1, 1.0)])
    with pytest.raises(UserInputError, match=r"train\.nope"):
        check_search_space(config, [LogUniform("train.nope", 0.1, 1.0)])
    # lam's high end with the default personal_lr 0.01: 0.01 x 300 >= 2
    with pytest.raises(UserInputError, match=r"lam ~ log-uniform \[1, 300\] at pfedme\.lam=300"):
        check_search_space(config, [LogUniform("lam", 1.0, 300.0)])
    # the common client-lr range does not fit pFedMe (lr x lam = 0.3 x 15 >= 2): its own is narrower
    with pytest.raises(UserInputError, match=r"train\.lr ~ log-uniform \[0\.001, 0\.3\] at train\.lr=0\.3"):
        check_search_space(config, [CLIENT_LR])
    with pytest.raises(UserInputError, match="names train.lr twice"):
        check_search_space(_config("--algorithm=fedavg"), [CLIENT_LR, CLIENT_LR])
    with pytest.raises(UserInputError, match="not a Hyperparameter"):
        check_search_space(config, ["train.lr"])
    with pytest.raises(UserInputError, match="hn_optimizer"):
        check_search_space(_config("--algorithm=pfedla"), [Choice("hn_optimizer", ("sgd", "rmsprop"))])


def test_a_malformed_hyperparameter_is_refused_when_built():
    for make in (lambda: LogUniform("x", 0.0, 1.0), lambda: Uniform("x", 2.0, 1.0),
                 lambda: IntRange("x", 1, 2.5), lambda: Choice("x", ()),
                 lambda: Hyperparameter("x", "normal", 0, 1), lambda: Uniform("1x", 0, 1)):
        with pytest.raises(ValueError):
            make()


def test_override_flags_build_the_config_apply_overrides_builds():
    assert override_flags({"train.lr": 0.05, "pfedla.hn_lr": 0.1, "rounds": 5}) == \
        ["--lr=0.05", "--pfedla_hn_lr=0.1", "--rounds=5"]
    assert override_flags({"fedfomo.val_redraw": True, "pfedla.hn.embed_dim": 8}) == \
        ["--fedfomo_val_redraw=true", "--pfedla_hn_embed_dim=8"]
    for name in algorithm_names():
        base_argv = [f"--algorithm={name}", "--local_epochs=5"]
        base = _config(*base_argv)
        space = resolve_space(base)
        for end in (0, -1):
            params = {override_key(name, h.path): h.values_to_check()[end] for h in space}
            params["train.lr"] = 0.012345678901234567  # repr keeps every digit
            assert _config(*base_argv, *override_flags(params)) == apply_overrides(base, params), name
    nested = {"pfedla.hn.embed_dim": 7, "pfedla.hn_optimizer": "adam"}
    assert _config("--algorithm=pfedla", *override_flags(nested)) == apply_overrides(_config("--algorithm=pfedla"), nested)


def test_suggest_draws_every_kind_through_an_optuna_trial():
    space = (CLIENT_LR, IntRange("inner_steps", 1, 10), Choice("flag", (True, False)))
    fixed = {"train.lr": 0.02, "pfedme.inner_steps": 7, "pfedme.flag": False}
    assert suggest(optuna.trial.FixedTrial(fixed), "pfedme", space) == fixed
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    drawn = suggest(trial, "pfedla", search_space("pfedla"))
    assert set(drawn) == {"train.lr", "pfedla.hn_lr", "pfedla.hn_optimizer"}
    assert 1e-3 <= drawn["train.lr"] <= 0.3 and drawn["pfedla.hn_optimizer"] in ("sgd", "adam")
    assert isinstance(trial.distributions["train.lr"], optuna.distributions.FloatDistribution)
    assert trial.distributions["train.lr"].log


def test_the_default_space_is_the_client_lr():
    assert algorithm_class("fedavg").search_space == (CLIENT_LR,)  # the default
    assert [h.path for h in search_space("pfedhn")] == ["train.lr", "hn_lr", "embed_lr"]
