"""Contracts every registered method keeps (issue 20): ``check_model`` only checks (it stores nothing
of the model on the instance, so one instance may serve models of different shapes), and traced
hyperparameters reach a method as a value (:meth:`Method.with_hparams`, a bound copy)."""

import copy

import ml_collections
import pytest

from mcr_jax.methods import METHODS, get_method
from mcr_jax.models import build_model
from tests.helpers.method_setup import toy_data

#: options a method cannot be built without on the toy data.
EXTRA = {"unimodal": {"modality": "x1"},
         "uni_pre": {"pretrained": {"x1": "/nonexistent/x1", "x2": "/nonexistent/x2"}}}


def _method(name):
    _, info, _ = toy_data()
    return get_method(ml_collections.ConfigDict({"name": name, **EXTRA.get(name, {})}), info)


def _model(**model_options):
    cfg, info, _ = toy_data()
    cfg.model.fusion = "linear"
    cfg.model.update(model_options)
    return build_model(cfg.model, info, seed=0)


def _snapshot(method):
    return {k: (v, copy.deepcopy(v) if isinstance(v, (dict, list, tuple, set)) else v) for k, v in vars(method).items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_model_leaves_the_instance_unchanged(name):
    method = _method(name)
    before = _snapshot(method)
    method.check_model(_model())
    after = vars(method)
    assert sorted(after) == sorted(before), f"{name}.check_model added or removed attributes"
    for k, (obj, value) in before.items():
        assert after[k] is obj, f"{name}.check_model replaced self.{k}"
        if isinstance(value, (dict, list, tuple, set)):
            assert after[k] == value, f"{name}.check_model changed self.{k}"


@pytest.mark.parametrize("name", ["pmr", "gblending", "umt"])
def test_one_instance_serves_models_of_different_shapes(name):
    method = _method(name)
    small, large = _model(latent_dim=8), _model(latent_dim=16)
    method.check_model(small)
    method.check_model(large)
    if name == "pmr":  # the prototypes' shapes follow each model's own parameters
        from mcr_jax.state import split_model

        for model, d in ((small, 8), (large, 16)):
            protos = method.init_method_state(split_model(model).params)["protos"]
            assert {m: p.shape for m, p in protos.items()} == {m: (5, d) for m in protos}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_with_hparams_binds_a_copy(name):
    method = _method(name)
    bound = method.with_hparams({"learning_rate": 0.1, **{k: 0.5 for k in method.traceable}})
    assert bound is not method and type(bound) is type(method)
    assert method.hparams == {} and bound.hparams == {k: 0.5 for k in method.traceable}
    assert all(bound.tuned(k) and bound.hp(k, 1.0) == 0.5 for k in method.traceable)
    assert not bound.tuned("learning_rate") and method.hp("x", 3) == 3
    with pytest.raises(ValueError, match=f"{name}: options \\['not_an_option'\\] cannot be traced"):
        method.with_hparams({"not_an_option": 1.0})


# ---- what the orchestrators ask (issue 20 item 4) -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declarations_are_as_documented(name):
    from mcr_jax.methods import Method

    method = _method(name)
    for flag in ("needs_unimodal_runs", "per_modality", "gives_sampling_weights", "uses_fusion"):
        assert isinstance(getattr(method, flag), bool), flag
    ok, reason = method.vectorizable()
    assert isinstance(ok, bool) and isinstance(reason, str) and (ok == (reason == ""))
    overrides = type(method).sampling_weights is not Method.sampling_weights
    assert method.gives_sampling_weights == overrides


def test_the_declarations_reproduce_the_comparison_layout():
    from mcr_jax import report, train
    from mcr_jax.methods import ORCHESTRATED
    from mcr_jax.seeds import vectorizable

    assert set(ORCHESTRATED) == set(train.ORCHESTRATORS)
    # the methods run seed by seed on their seed's unimodal runs (formerly the list report.PER_SEED)
    assert [n for n in report.DEFAULT_METHODS if report.needs_unimodal_runs(n)] == [
        "ensemble", "ume", "uni_pre_frozen", "uni_pre_finetuned", "umt"]
    assert [n for n in report.DEFAULT_METHODS if report.per_modality(n)] == ["unimodal"]
    assert sorted(n for n in METHODS if _method(n).gives_sampling_weights) == ["valuation"]
    assert sorted(n for n in METHODS if not _method(n).vectorizable()[0]) == ["umt"]
    _, info, _ = toy_data()
    local = get_method(ml_collections.ConfigDict({"name": "mcr", "permutation_scope": "local"}), info)
    assert vectorizable(local) == "MCR's local permutation scope runs under shard_map"
    assert vectorizable(_method("mcr")) is None
    assert "keeps per-run state" in vectorizable(_method("umt"))
