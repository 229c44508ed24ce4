"""The config is the single source of truth: section defaults defined once and shared by the
experiment configs and the library, one option-merging helper, a locked resolved config."""

import ml_collections
import pytest

from experiments.configs import base, synthetic
from mcr_jax import guards, optim
from mcr_jax.config import SECTIONS, resolve_config
from mcr_jax.methods import METHODS, method_class, method_defaults
from mcr_jax.options import merge_options


def test_the_experiment_configs_start_from_the_library_defaults():
    c = base.base_config()
    for name, defaults in SECTIONS.items():
        assert c[name].to_dict() == defaults, name
    for name in METHODS:
        assert base.base_config(f"method={name}").method.to_dict() == {"name": name, **method_defaults(name)}


def test_a_config_built_in_code_resolves_to_the_same_run_as_a_full_one():
    full = synthetic.get_config("smoke")
    minimal = ml_collections.ConfigDict({"data": full.data.to_dict(), "model": full.model.to_dict(),
                                         "method": {"name": "mcr"}})
    got = resolve_config(minimal)
    assert got.train.patience == 10 and got.optim.eps == 1e-7 and got.eval.mipd_samples == 8
    want = resolve_config(base.base_config())
    for name in SECTIONS:
        assert got[name].to_dict() == want[name].to_dict()


def test_resolve_refuses_typos_locks_and_is_idempotent():
    c = synthetic.get_config("smoke")
    c.train.patiance = 3
    with pytest.raises(ValueError, match=r"unknown train options \['patiance'\]"):
        resolve_config(c)
    c = synthetic.get_config("smoke")
    c.optimizer = {"eps": 1e-8}
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['optimizer'\]"):
        resolve_config(c)
    resolved = resolve_config(synthetic.get_config("smoke"))
    with pytest.raises(AttributeError, match="locked"):
        resolved.train.patiance = 3
    assert resolve_config(resolved).to_dict() == resolved.to_dict()
    with pytest.raises(ValueError, match="no \\['model'\\]"):
        resolve_config({"data": {}, "method": {"name": "mcr"}})


def test_optimizer_options_resolve_once_with_the_config_defaults():
    with pytest.raises(ValueError, match=r"unknown optim options \['epsilon'\]"):
        optim.make_optimizer(ml_collections.ConfigDict({"epsilon": 1e-8}), 10)
    assert optim.DEFAULTS["eps"] == SECTIONS["optim"]["eps"] == 1e-7


def test_merge_options_and_method_options():
    assert merge_options({"a": 1, "b": 2}, {"b": 3, "name": "x"}, where="demo", ignore=("name",)) == {"a": 1, "b": 3}
    with pytest.raises(ValueError, match=r"unknown demo options \['c'\]; the known options are \['a'\]"):
        merge_options({"a": 1}, {"c": 1}, where="demo")
    cls = method_class("reconboost")
    assert cls.option_defaults() == method_defaults("reconboost")


def test_a_stored_config_without_an_option_added_at_its_default_is_the_same_run():
    now = resolve_config(synthetic.get_config("smoke")).to_dict()
    old = {k: (dict(v) if isinstance(v, dict) else v) for k, v in now.items()}
    old["train"] = {k: v for k, v in now["train"].items() if k != "compiled_epochs"}
    guards.check_same_config(old, now, "/w", "a run")  # added since, at its default: same run
    old["train"] = {k: v for k, v in now["train"].items() if k != "patience"}
    changed = dict(now, train=dict(now["train"], patience=3))
    with pytest.raises(ValueError, match=r"train.patience: \(absent\) -> 3"):
        guards.check_same_config(old, changed, "/w", "a run")
