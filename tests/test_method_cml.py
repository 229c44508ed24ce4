"""CML tests: the removal chain, confidences, hinges and loss against float64 NumPy; the released loss
and its gradients (golden); one trainer run; the clear errors.

Golden reference: GeWu-Lab/BalanceBenchmark (commit 4c1482f), ``balancemm/trainer/CML_trainer.py``:
``conf_loss`` (lines 19-22: ``max(0, (conf_x - conf).sum())``; ``sign`` unused) and
``CMLTrainer.train_loop`` (line 67, one ``random.shuffle`` per epoch) and ``CMLTrainer.training_step``,
the two-modality branch inside the window (lines 170-201:
``out_p = out_s - unimodal_result[removed_mm] + fc_out.bias / 2``, ``torch.max(softmax(.))``
confidences, ``loss = criterion(out_s) + criterion(out_p)``, ``loss = loss / 2 + lam * _loss_c``) and
the three-modality branch (lines 121-156, divisor 3, ``bias / 3``), with the unimodal logits of
``balancemm/models/avclassify_model.py`` ``BaseClassifierModel.unimodality_calculate`` (lines 277-299:
``u_m = z_m W_m^T + b / M``). It is transcribed below into NumPy without using ``mcr_jax.methods``;
its gradient is written by hand and carried to the parameters through the model's own VJP.

The authors' form (``form="authors"``): QingyangZhang/CML (commit 85075b5), ``miwae/train.py``, the
``# stage 2`` loop (the per-example ``ReLU(...).sum()`` with ``sign`` = the larger model right, the
second term with ``confidence_list[num].clone().detach()`` where both are wrong, ``- args.epsilon``
inside each ReLU, ``rank_loss * args.beta / 100``) and ``get_multi_mask`` (one shuffled order per
example), transcribed into NumPy below; the issue's two-row example gives the golden values 0.05
(authors) and 0.25 (BalanceBenchmark).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.cml import authors_hinges, cml_loss, confidence, confidence_hinges, keep_masks, sub_model_logits
from mcr_jax.tasks import get_task
from tests.helpers.method_checks import NAMES, assert_trees_close, f64, inputs, jit_gradients, log_softmax, smoke_run
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_setup import build, with_fusion_bias
from tests.helpers.method_setup import toy_data as _data
from tests.helpers.method_setup import toy_regression_info as _regression_info
from tests.helpers.numpy_refs import softmax

# ---- the released rule, transcribed (any M, as the release's M = 2 and M = 3 branches) ----------------


def _release_loss(out, uni, bias, label, random_dict, lam, w=None):
    """training_step inside the window: ``out`` fused logits, ``uni[m] = z_m W_m + b / M``, the epoch's
    shuffled ``random_dict`` (popped from its end). ``w``: row weights (padding 0; the release has none)."""
    m_num = len(uni)
    w = np.ones(len(label)) if w is None else f64(w)

    def crit(x):  # nn.CrossEntropyLoss (mean over the valid rows)
        return float(-np.sum(log_softmax(x)[np.arange(len(label)), label] * w) / w.sum())

    out_s, rd, loss, loss_c, hinge_active = f64(out), list(random_dict), 0.0, 0.0, []
    for i in range(m_num - 1):
        removed = rd.pop()
        out_p = out_s - f64(uni[removed]) + f64(bias) / m_num
        conf_s, conf_p = softmax(out_s).max(1), softmax(out_p).max(1)
        if i == 0:
            loss = crit(out_s)
        loss += crit(out_p)
        gap = float(np.sum((conf_p - conf_s) * w))
        loss_c += max(0, gap)
        hinge_active.append(gap > 0)
        out_s = out_p
    return loss / m_num + lam * loss_c, hinge_active


def _release_grads_two(out, uni, bias, label, removed, lam):
    """Hand-written d loss / d (out, uni[x1], uni[x2], bias) of the M = 2 release loss."""
    out, n = f64(out), len(label)
    out_p = out - f64(uni[removed]) + f64(bias) / 2
    onehot = np.eye(out.shape[1])[label]

    def dconf(x):  # d max_k softmax(x)_k / dx = p_k (e_k - p) per row (k = argmax)
        p = softmax(x)
        k = p.argmax(1)
        return p[np.arange(n), k][:, None] * (np.eye(x.shape[1])[k] - p)

    active = float(np.sum(softmax(out_p).max(1) - softmax(out).max(1)) > 0)
    g_p = (softmax(out_p) - onehot) / n / 2 + lam * active * dconf(out_p)
    g_out = (softmax(out) - onehot) / n / 2 - lam * active * dconf(out) + g_p
    g_uni = {m: (-g_p if m == removed else np.zeros_like(g_p)) for m in NAMES}
    return g_out, g_uni, g_p.sum(0) / 2, bool(active)


# ---- unit tests against float64 NumPy -----------------------------------------------------------------


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_rule_against_numpy(perm):
    rng = np.random.default_rng(0)
    m_num, b, c = 3, 9, 4
    y = rng.integers(0, c, size=b)
    w = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    branches = rng.normal(size=(m_num, b, c)) * 2.0
    bias = rng.normal(size=c)
    fused = branches.sum(0) + bias
    keep = np.asarray(keep_masks(jnp.asarray(perm)))
    # step i removes perm[M - i]: after step 1 the last of the order is gone, after step 2 two are
    want_keep = np.array([[float(j in perm[: m_num - i]) for j in range(m_num)] for i in (1, 2)])
    np.testing.assert_array_equal(keep, want_keep)
    subs = np.asarray(sub_model_logits(jnp.asarray(fused, jnp.float32), jnp.asarray(branches, jnp.float32),
                                       jnp.asarray(keep)))
    for i in range(m_num - 1):
        np.testing.assert_allclose(subs[i], (branches * want_keep[i][:, None, None]).sum(0) + bias, atol=1e-5)
    np.testing.assert_allclose(confidence(jnp.asarray(subs)), np.stack([softmax(s).max(1) for s in subs]), rtol=1e-5)
    rule = jax.jit(functools.partial(cml_loss, get_task("classification")))
    for lam in (0.0, 0.1, 2.0):
        loss, ce_full, ce_sub, conf, gap = rule(jnp.asarray(fused, jnp.float32), jnp.asarray(subs), jnp.asarray(y),
                                                jnp.asarray(w), lam)
        uni = {j: branches[j] + bias / m_num for j in range(m_num)}
        want, _ = _release_loss(fused, uni, bias, y, list(perm), lam, w)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        chain = [fused, *subs]
        gaps = [sum(w[n] * (softmax(chain[i + 1])[n].max() - softmax(chain[i])[n].max()) for n in range(b))
                for i in range(m_num - 1)]
        np.testing.assert_allclose(conf, sum(max(0.0, g) for g in gaps), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gap, sum(gaps), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ce_full, _ce(fused[:7], y[:7]), rtol=1e-5)
        np.testing.assert_allclose(ce_sub, np.mean([_ce(s[:7], y[:7]) for s in subs]), rtol=1e-5)
    # the hinge: a negative gap gives 0 and no gradient; a positive one is the gap itself
    chain = jnp.asarray(np.stack([fused * 3.0, fused]), jnp.float32)  # the sharper one first: gap < 0
    h, g = confidence_hinges(chain)
    assert float(g[0]) < 0 and float(h[0]) == 0.0
    assert float(jnp.abs(jax.grad(lambda x: confidence_hinges(x)[0].sum())(chain)).sum()) == 0.0
    h, g = confidence_hinges(chain[::-1])
    np.testing.assert_allclose(h, g, rtol=1e-6)


# ---- golden: the released loss and its gradients -------------------------------------------------------


@pytest.fixture(scope="module")
def golden_case():
    method, handle, params, batch, _ = build({"name": "cml", "lam": 0.5})
    return method, handle, with_fusion_bias(params), batch, jit_gradients(method, handle)


def _epoch_removing(step, params, batch, removed):
    """The first (1-based) epoch whose removal order removes ``removed`` first."""
    for epoch in range(1, 20):
        mets = step(params, batch, jax.random.PRNGKey(0), {}, epoch=epoch)[4]
        if float(mets[f"removed_{removed}"]) == 1.0:
            return epoch
    raise AssertionError(f"no epoch removes {removed}")


@pytest.mark.parametrize("removed,sharpen", [("x1", 1.0), ("x2", 1.0), ("x1", 4.0), ("x2", 4.0)])
def test_golden_loss_and_gradients_match_the_release(golden_case, removed, sharpen):
    method, handle, params, batch, step = golden_case
    kept = NAMES[1 - NAMES.index(removed)]
    # sharpen the kept modality's branch: the sub-model's confidence then tends to exceed the full one's
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * sharpen if jax.tree_util.keystr(p) == f"['fusion']['branches']['{kept}']['kernel']" else x,
        params)
    y = np.asarray(batch["label"])

    def model_out(p):  # out, unimodality_calculate's u_m = z_m W_m + b / 2, and the bias
        out = handle.train_model(p)(inputs(batch))
        b = p["fusion"]["bias"]
        uni = {m: out["latents"][m] @ p["fusion"]["branches"][m]["kernel"] + b[None] / 2 for m in NAMES}
        return out["logits"], uni["x1"], uni["x2"], b

    (logits, u1, u2, b), vjp = jax.vjp(model_out, params)
    uni = {"x1": u1, "x2": u2}
    epoch = _epoch_removing(step, params, batch, removed)
    random_dict = [kept, removed]  # the release pops its last entry
    want, active = _release_loss(logits, uni, b, y, random_dict, 0.5)
    g_out, g_uni, g_b, active2 = _release_grads_two(logits, uni, b, y, removed, 0.5)
    assert active == [active2]
    grads, _, _, _, mets = step(params, batch, jax.random.PRNGKey(0), {}, epoch=epoch)
    np.testing.assert_allclose(mets["loss"], want, rtol=1e-5)
    assert float(mets["conf_loss"] > 0) == float(active2)
    (ref,) = vjp(tuple(jnp.asarray(g, jnp.float32) for g in (g_out, g_uni["x1"], g_uni["x2"], g_b)))
    assert_trees_close(grads, ref, rtol=2e-4)
    # outside the window: the plain fused CE
    _, _, _, _, m2 = step(params, batch, jax.random.PRNGKey(0), {}, epoch=82)
    np.testing.assert_allclose(m2["loss"], _ce(f64(logits), y), rtol=1e-5)
    assert float(m2["active"]) == 0.0


def test_golden_cases_exercise_both_sides_of_the_hinge(golden_case):
    method, handle, params, batch, step = golden_case
    seen = set()
    for removed in NAMES:
        kept = NAMES[1 - NAMES.index(removed)]
        for sharpen in (1.0, 4.0):
            p = jax.tree_util.tree_map_with_path(
                lambda q, x, s=sharpen, k=kept: x * s
                if jax.tree_util.keystr(q) == f"['fusion']['branches']['{k}']['kernel']" else x, params)
            mets = step(p, batch, jax.random.PRNGKey(0), {}, epoch=_epoch_removing(step, p, batch, removed))[4]
            seen.add(float(mets["conf_loss"]) > 0)
    assert seen == {True, False}


def test_padding_rows_and_step_order(golden_case):
    method, handle, params, batch, step = golden_case
    ms = method.init_method_state(params)
    _, _, _, _, mets = step(params, batch, jax.random.PRNGKey(0), ms)
    pad = {k: jnp.concatenate([v, v[:8] * 0 + (0 if k == "label" else 5)], 0) for k, v in batch.items()}
    pad["mask"] = jnp.concatenate([jnp.ones(len(batch["label"])), jnp.zeros(8)])
    _, _, _, _, mets_pad = step(params, pad, jax.random.PRNGKey(0), ms)
    for k in ("loss", "task", "ce_sub", "conf_loss", "conf_gap", "removed_x1"):
        np.testing.assert_allclose(mets_pad[k], mets[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # order="epoch": fixed within an epoch whatever the step key; order="step": follows the step key
    orders = {tuple(np.asarray(method.removal_order(jax.random.PRNGKey(k), jnp.int32(1)))) for k in range(8)}
    assert len(orders) == 1
    per_step = get_method(ml_collections.ConfigDict({"name": "cml", "order": "step"}), _data()[1])
    orders = {tuple(np.asarray(per_step.removal_order(jax.random.PRNGKey(k), jnp.int32(1)))) for k in range(8)}
    assert orders == {(0, 1), (1, 0)}


# ---- one trainer run -----------------------------------------------------------------------------------


def test_smoke_run(tmp_path):
    _, history = smoke_run(tmp_path, {"name": "cml"})
    for h in history:
        t = h["train"]
        assert all(np.isfinite(t[k]) for k in ("loss", "task", "ce_sub", "conf_loss", "conf_gap"))
        assert t["active"] == 1.0
        assert t["removed_x1"] + t["removed_x2"] == pytest.approx(1.0)  # one order per epoch, M = 2
        assert t["removed_x1"] in (0.0, 1.0)


# ---- errors and defaults -------------------------------------------------------------------------------


def test_defaults_and_clear_errors():
    _, info, _ = _data()
    method = get_method(ml_collections.ConfigDict({"name": "cml"}), info)
    assert method.name == "cml" and method.opts["lam"] == 0.1
    assert (method.opts["start_epoch"], method.opts["end_epoch"]) == (1, 81)
    assert method.init_method_state({}) == {}  # the epoch is the trainer's (ModelHandle.epoch)
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "cml"}), _regression_info())
    with pytest.raises(ValueError, match="unknown method 'cml' options"):
        get_method(ml_collections.ConfigDict({"name": "cml", "alpha": 1.0}), info)
    with pytest.raises(ValueError, match="order"):
        get_method(ml_collections.ConfigDict({"name": "cml", "order": "batch"}), info)
    with pytest.raises(ValueError, match="lam"):
        get_method(ml_collections.ConfigDict({"name": "cml", "lam": -1.0}), info)
    one = DatasetInfo(name="toy", modalities=("x1",), input_shapes={"x1": info.input_shapes["x1"]},
                      num_classes=5)
    with pytest.raises(ValueError, match="at least two modalities"):
        get_method(ml_collections.ConfigDict({"name": "cml"}), one)
    with pytest.raises(ValueError, match="separable fusion"):
        build({"name": "cml"}, fusion="concat_mlp")


# ---- the authors' form (QingyangZhang/CML, miwae/train.py) ---------------------------------------------


def _authors_rank_loss(chain, label, eps=0.0, w=None):
    """The release's stage-2 rank loss over ``chain`` (``confidence_list``/``predict_list`` of the
    inputs with 0, 1, … views removed), transcribed; ``w``: row weights (padding 0; the release has none).
    Also returns its gradient with respect to every logit of the chain (hand-written)."""
    chain, w = f64(chain), (np.ones(len(label)) if w is None else f64(w))
    n = len(label)
    probs = [softmax(x) for x in chain]
    conf = [p.max(1) for p in probs]
    pred = [p.argmax(1) for p in probs]

    def dconf(i):  # d max_k softmax(x)_k / dx per row
        p, k = probs[i], pred[i]
        return p[np.arange(n), k][:, None] * (np.eye(chain.shape[2])[k] - p)

    loss, grad = 0.0, np.zeros_like(chain)
    for num in range(len(chain) - 1):
        sign = (pred[num] == label).astype(float)  # ~(predict_list[num] != target)
        x1 = (conf[num + 1] - conf[num]) * sign - eps
        sign1 = ((pred[num + 1] != label) & (pred[num] != label)).astype(float)
        x2 = (conf[num + 1] - conf[num]) * sign1 - eps  # conf2 detached: its value, no gradient
        loss += float(np.sum(np.maximum(x1, 0) * w) + np.sum(np.maximum(x2, 0) * w))
        a1, a2 = (x1 > 0) * sign * w, (x2 > 0) * sign1 * w
        grad[num + 1] += (a1 + a2)[:, None] * dconf(num + 1)
        grad[num] -= a1[:, None] * dconf(num)
    return loss, grad


def _two_class_logits(conf, pred):
    """Rows of 2-class logits whose softmax maximum is ``conf`` (> 0.5) at class ``pred``."""
    out = np.zeros((len(conf), 2))
    for i, (c, k) in enumerate(zip(conf, pred, strict=True)):
        out[i, k] = np.log(c / (1 - c))
    return out


def test_the_issues_example_authors_and_balancebenchmark():
    """ε = 0, B = 2: full model (0.9, 0.6), right on row 0 only; sub-model (0.95, 0.8), right on row 1
    only: the authors' form gives 0.05, BalanceBenchmark's 0.25 (values from the issue)."""
    y = np.array([0, 0])
    full = _two_class_logits([0.9, 0.6], [0, 1])  # row 0 right, row 1 wrong
    sub = _two_class_logits([0.95, 0.8], [1, 0])  # row 0 wrong, row 1 right
    chain = jnp.asarray(np.stack([full, sub]), jnp.float32)
    np.testing.assert_allclose(confidence(chain), [[0.9, 0.6], [0.95, 0.8]], rtol=1e-6)
    r, gap = authors_hinges(chain, jnp.asarray(y))
    np.testing.assert_allclose(r, [0.05], rtol=1e-5)
    np.testing.assert_allclose(gap, [0.25], rtol=1e-5)
    h, _ = confidence_hinges(chain)
    np.testing.assert_allclose(h, [0.25], rtol=1e-5)
    task = get_task("classification")
    for form, want in (("authors", 0.05), ("balancebenchmark", 0.25)):
        conf_loss = cml_loss(task, chain[0], chain[1:], jnp.asarray(y), None, 1.0, form)[3]
        np.testing.assert_allclose(conf_loss, want, rtol=1e-5, err_msg=form)
    # a margin ε > gap switches row 0 off
    np.testing.assert_allclose(authors_hinges(chain, jnp.asarray(y), margin=0.06)[0], [0.0], atol=1e-7)


@pytest.mark.parametrize("m_num,eps", [(2, 0.0), (3, 0.0), (3, 0.02)])
def test_authors_form_and_its_gradient_against_the_release(m_num, eps):
    rng = np.random.default_rng(m_num)
    b, c = 40, 3
    y = rng.integers(0, c, size=b)
    w = np.r_[np.ones(b - 4), np.zeros(4)]
    chain = rng.normal(size=(m_num, b, c)) * 2.0
    want, want_grad = _authors_rank_loss(chain, y, eps, w)
    x = jnp.asarray(chain, jnp.float32)
    got, _ = authors_hinges(x, jnp.asarray(y), jnp.asarray(w, jnp.float32), eps)
    np.testing.assert_allclose(float(jnp.sum(got)), want, rtol=1e-5)
    grad = jax.grad(lambda z: jnp.sum(authors_hinges(z, jnp.asarray(y), jnp.asarray(w, jnp.float32), eps)[0]))(x)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    # both tricks are exercised by these draws: a gated-on "right" row and a "both wrong" row
    probs = [softmax(z) for z in chain]
    right = [p.argmax(1) == y for p in probs]
    assert right[0].any() and (~right[1] & ~right[0]).any()
    # the loss: the mean CE of the chain + lam * that rank loss (the release: cls_loss / M + beta/100 * rank)
    task = get_task("classification")
    loss = cml_loss(task, x[0], x[1:], jnp.asarray(y), jnp.asarray(w, jnp.float32), 0.1, "authors", eps)[0]
    ce_mean = np.mean([_ce(z[: b - 4], y[: b - 4]) for z in chain])
    np.testing.assert_allclose(loss, ce_mean + 0.1 * want, rtol=1e-5)


def test_per_sample_removal_orders():
    rng = np.random.default_rng(1)
    perms = np.stack([rng.permutation(3) for _ in range(6)])
    keep = np.asarray(keep_masks(jnp.asarray(perms)))
    assert keep.shape == (2, 6, 3)
    for n, perm in enumerate(perms):
        for i in (1, 2):
            np.testing.assert_array_equal(keep[i - 1, n], [float(j in perm[: 3 - i]) for j in range(3)])
    branches = rng.normal(size=(3, 6, 4))
    fused = branches.sum(0) + 0.3
    subs = np.asarray(sub_model_logits(jnp.asarray(fused, jnp.float32), jnp.asarray(branches, jnp.float32),
                                       jnp.asarray(keep)))
    want = np.stack([(branches * keep[i].T[:, :, None]).sum(0) + 0.3 for i in range(2)])
    np.testing.assert_allclose(subs, want, rtol=1e-5, atol=1e-5)
    _, info, _ = _data()
    method = get_method(ml_collections.ConfigDict({"name": "cml", "form": "authors"}), info)
    assert method.order == "sample"
    orders = np.asarray(method.removal_order(jax.random.PRNGKey(0), jnp.int32(1), 64))
    assert orders.shape == (64, 2) and {tuple(o) for o in orders} == {(0, 1), (1, 0)}  # per row, both orders
    again = np.asarray(method.removal_order(jax.random.PRNGKey(1), jnp.int32(1), 64))
    assert not np.array_equal(orders, again)  # drawn afresh every step
    with pytest.raises(ValueError, match="batch_size"):
        method.removal_order(jax.random.PRNGKey(0), jnp.int32(1))


def test_authors_form_step_against_the_release(golden_case):
    """A trainer step with ``form="authors"``: the removal order per row from the step key, the loss =
    the mean CE of the full and the per-row sub-model + lam * the release's rank loss (NumPy)."""
    _, handle, params, batch, _ = golden_case
    method = get_method(ml_collections.ConfigDict({"name": "cml", "form": "authors", "lam": 0.5}), _data()[1])
    step = jit_gradients(method, handle)
    y = np.asarray(batch["label"])
    out = handle.train_model(params)(inputs(batch))
    fused = f64(out["logits"])
    branch = {m: f64(out["latents"][m] @ params["fusion"]["branches"][m]["kernel"]) for m in NAMES}
    key = jax.random.PRNGKey(3)
    perm = np.asarray(method.removal_order(key, jnp.int32(1), len(y)))
    removed = perm[:, -1]  # M = 2: the last of each row's order is removed
    sub = fused - np.stack([branch[NAMES[r]][n] for n, r in enumerate(removed)])
    rank, _ = _authors_rank_loss(np.stack([fused, sub]), y)
    want = (_ce(fused, y) + _ce(sub, y)) / 2 + 0.5 * rank
    mets = step(params, batch, key, {})[4]
    np.testing.assert_allclose(mets["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(mets["conf_loss"], rank, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mets["removed_x1"], np.mean(removed == 0), rtol=1e-6)
    assert 0 < float(mets["removed_x1"]) < 1


def test_authors_form_options_and_errors(tmp_path):
    _, info, _ = _data()
    default = get_method(ml_collections.ConfigDict({"name": "cml"}), info)
    assert (default.opts["form"], default.order, default.opts["margin"]) == ("balancebenchmark", "epoch", 0.0)
    step_order = get_method(ml_collections.ConfigDict({"name": "cml", "form": "authors", "order": "epoch"}), info)
    assert step_order.order == "epoch"
    with pytest.raises(ValueError, match="method.form must be one of"):
        get_method(ml_collections.ConfigDict({"name": "cml", "form": "mcca"}), info)
    with pytest.raises(ValueError, match="margin is the authors' form's epsilon"):
        get_method(ml_collections.ConfigDict({"name": "cml", "margin": 0.1}), info)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        get_method(ml_collections.ConfigDict({"name": "cml", "form": "authors", "margin": -0.1}), info)
    _, history = smoke_run(tmp_path, {"name": "cml", "form": "authors"})
    assert all(np.isfinite(h["train"]["conf_loss"]) and h["train"]["active"] == 1.0 for h in history)
