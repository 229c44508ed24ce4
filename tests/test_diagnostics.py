"""Diagnostics of the reproduction study: MCR's per-term, per-player gradient norms and the
training-dynamics charts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.base import method_config
from mcr_jax import dynamics, game
from mcr_jax.methods.mcr import GRAD_NORM_TERMS
from tests.helpers.method_setup import build


def _mcr(**options):
    cfg = method_config("mcr")
    cfg.num_permutations = 4
    for k, v in options.items():
        cfg[k] = v
    return build(cfg)


def _player_norm(grads, players, i):
    sq = sum(float(np.sum(np.square(np.asarray(g, np.float64))))
             for g, owner in zip(jax.tree.leaves(grads), jax.tree.leaves(players), strict=True) if owner == i)
    return np.sqrt(sq)


def test_grad_norms_split_the_step_gradient_into_its_terms():
    method, handle, params, batch, _ = _mcr(grad_norms=True, mipd_weight=0.5, con_weight=0.3, uni_weight=0.2)
    key = jax.random.PRNGKey(3)
    step = method.gradients(handle, params, batch, key, {})
    terms = method._weighted_terms(handle, params, batch, key, {})
    # the weighted terms sum to the loss, and their gradients to the step's gradient
    assert float(jnp.sum(terms)) == pytest.approx(float(step.metrics["loss"]), rel=1e-5)
    jac = jax.jacrev(method._weighted_terms, argnums=1)(handle, params, batch, key, {})
    for g_sum, g in zip(jax.tree.leaves(jax.tree.map(lambda j: j.sum(0), jac)), jax.tree.leaves(step.grads),
                        strict=True):
        np.testing.assert_allclose(np.asarray(g_sum), np.asarray(g), rtol=2e-4, atol=1e-6)
    # the task term's norm per player, recomputed from the model's own forward pass
    players = game.assign_players(params, method.modalities, require_all=False)

    def task(p):
        out = method.forward(handle.train_model(p), batch)
        return optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]).mean()

    g_task = jax.grad(task)(params)
    for i, m in enumerate(method.modalities):
        assert float(step.metrics[f"gnorm_task_{m}"]) == pytest.approx(_player_norm(g_task, players, i), rel=1e-4)
        assert float(step.metrics[f"gnorm_mipd_{m}"]) > 0
        assert float(step.metrics[f"gnorm_ceb_{m}"]) == 0.0  # λ_CEB = 0
    assert {f"gnorm_{t}_{m}" for t in GRAD_NORM_TERMS for m in method.modalities} <= set(step.metrics)


def test_grad_norms_of_a_switched_off_term_are_zero_and_the_option_is_checked():
    method, handle, params, batch, _ = _mcr(grad_norms=True, mipd_weight=0.0)
    step = method.gradients(handle, params, batch, jax.random.PRNGKey(0), {})
    assert all(float(step.metrics[f"gnorm_mipd_{m}"]) == 0.0 for m in method.modalities)
    with pytest.raises(ValueError, match="grad_norms"):
        _mcr(grad_norms=True, game_form="optax")


def _history(path, epochs, acc_x2):
    with open(path / "metrics.jsonl", "w") as f:
        for e in range(epochs):
            val = {"fused_accuracy": 0.5 + 0.1 * e, "x1_accuracy": 0.4, "x2_accuracy": acc_x2[e],
                   "mipd_x1": 0.1, "mipd_x2": 0.01 * e}
            f.write(json.dumps({"epoch": e + 1, "val": val}) + "\n")


def test_dynamics_average_runs_of_different_lengths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _history(a, 3, [0.1, 0.2, 0.3])
    _history(b, 2, [0.3, 0.4])  # stopped early: its third epoch is absent, not zero
    avg = dynamics.average_curves([dynamics.read_history(str(a)), dynamics.read_history(str(b))], ("x1", "x2"))
    np.testing.assert_allclose(avg["x2"][0], [0.2, 0.3, 0.3])
    np.testing.assert_array_equal(avg["x2"][1], [2, 2, 1])
    assert set(avg) == {"fused", "x1", "x2", "mipd_x1", "mipd_x2"}
    assert dynamics.read_history(str(tmp_path / "none")) == []
    path = dynamics.run_chart(str(a), ("x1", "x2"))
    assert path.endswith("dynamics.png") and (a / "dynamics.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="history"):
        dynamics.dynamics_chart({"m": [[]]}, str(tmp_path / "x.png"), ("x1", "x2"))
