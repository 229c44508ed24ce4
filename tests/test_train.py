"""train_and_evaluate: a smoke run, resume equivalence, selection on validation only, the NaN stop,
and the orchestrated methods (ensemble, uni-pre) through the comparison runner."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import synthetic
from mcr_jax import data as data_lib
from mcr_jax import evaluation, report, study, train
from mcr_jax.checkpoint import Checkpointer
from mcr_jax.data.types import ArraySplit
from mcr_jax.models import build_model
from mcr_jax.programs import Programs, take
from mcr_jax.steps import EVAL_PERMUTATION_SEED


def smoke_config(**train_overrides):
    cfg = synthetic.get_config("smoke")
    cfg.train.num_epochs = 4
    cfg.train.patience = 0
    cfg.parallel.num_devices = 1  # sharding has its own tests (test_parallel.py)
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return cfg


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    return workdir, train.train_and_evaluate(smoke_config(), workdir)


def test_smoke_run_writes_everything(reference_run):
    workdir, res = reference_run
    assert res["epochs_run"] == 4 and 1 <= res["best_epoch"] <= 4
    assert set(res["test"]["heads"]) == {"fused", "x1", "x2"}
    assert set(res["test"]["mipd"]) == {"x1", "x2"}
    for split in ("validation", "test"):  # the Shapley diagnostic (tests/test_shapley.py), efficient
        sh, v = res[split]["shapley"], res[split]["shapley_subsets"]
        assert set(sh) == {"x1", "x2"} and set(v) == {"none", "x1", "x2", "x1+x2"}
        np.testing.assert_allclose(sum(sh.values()), v["x1+x2"] - v["none"], atol=1e-9)
        np.testing.assert_allclose(v["x1+x2"], res[split]["heads"]["fused"]["accuracy"], atol=1e-9)
    assert {r["group"] for r in res["test"]["error_groups"]} >= {"all unimodal right", "all unimodal wrong"}
    assert set(res["test"]["by_sample_type"]) <= {"-1", "0", "1"}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"loss", "task", "con", "mipd_x1", "mipd_x2", "grad_norm"} <= set(lines[0]["train"])
    preds = np.load(os.path.join(workdir, "predictions.npz"))
    assert preds["test_logits"].shape == (60, 5) and preds["test_labels"].shape == (60,)
    # A finished run is returned, not retrained.
    again = train.train_and_evaluate(smoke_config(), workdir)
    assert again == res


def test_interrupted_run_resumes_to_the_same_result(reference_run, tmp_path, monkeypatch):
    ref_dir, ref = reference_run
    original = Checkpointer.save

    def save_then_crash(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt("simulated interruption after epoch 2")

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(smoke_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
    monkeypatch.setattr(Checkpointer, "save", original)
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    assert res["best_epoch"] == ref["best_epoch"] and res["steps"] == ref["steps"]
    a, b = np.load(os.path.join(ref_dir, "predictions.npz")), np.load(tmp_path / "predictions.npz")
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)
    assert res["test"] == ref["test"]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3, 4]


def test_model_selection_never_looks_at_the_test_split(reference_run, tmp_path, monkeypatch):
    """Scrambling the test labels must not change which epoch is selected nor the validation results."""
    _, ref = reference_run
    real_load = data_lib.load

    def load_with_scrambled_test(cfg):
        data = real_load(cfg)
        test = data.splits["test"]
        labels = np.random.default_rng(0).permutation(np.asarray(test["label"]))
        data.splits["test"] = test.replace(label=labels)
        return data

    monkeypatch.setattr(data_lib, "load", load_with_scrambled_test)
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    assert res["best_epoch"] == ref["best_epoch"]
    assert res["validation"] == ref["validation"]
    assert res["test"]["heads"]["fused"]["accuracy"] != ref["test"]["heads"]["fused"]["accuracy"]


def test_non_finite_loss_stops_with_step_and_term(tmp_path, monkeypatch):
    real_load = data_lib.load

    def load_with_nan(cfg):
        data = real_load(cfg)
        train_split = data.splits["train"]
        x1 = np.array(train_split["x1"])
        x1[:] = np.nan
        data.splits["train"] = ArraySplit({**train_split.as_dict(), "x1": x1})
        return data

    monkeypatch.setattr(data_lib, "load", load_with_nan)
    with pytest.raises(FloatingPointError, match=r"non-finite .*task.* at step 0 \(epoch 1\)"):
        train.train_and_evaluate(smoke_config(checkpoint=False), str(tmp_path))


def test_overflowing_inputs_are_named_as_the_cause(tmp_path, monkeypatch):
    real_load = data_lib.load

    def load_huge(cfg):
        data = real_load(cfg)
        train_split = data.splits["train"]
        data.splits["train"] = ArraySplit({**train_split.as_dict(), "x1": np.array(train_split["x1"]) * 1e37})
        return data

    monkeypatch.setattr(data_lib, "load", load_huge)
    cfg = smoke_config(checkpoint=False)
    cfg.data.standardize = False
    with pytest.raises(FloatingPointError, match=r"inputs reach \|x\| = .*e\+3\d.* the inputs overflow"):
        train.train_and_evaluate(cfg, str(tmp_path))


def test_bad_batch_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="exceeds the 120 training examples"):
        train.train_and_evaluate(smoke_config(batch_size=1000), str(tmp_path))


def test_comparison_with_ensemble_and_frozen_uni_pre(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.parallel.num_devices = 1
    out = study.run_comparison(cfg, str(tmp_path), ["unimodal", "ensemble", "uni_pre_frozen"], seeds=[0])
    assert set(out["summary"]) == {"unimodal x1", "unimodal x2", "ensemble", "uni_pre_frozen"}
    table = report.format_table(out["summary"], out["modalities"])
    assert "| ensemble |" in table and "(n = 1)" in table  # one seed: no spread to report
    png = report.bar_chart(out["summary"], str(tmp_path / "c.png"))
    assert os.path.getsize(png) > 1000
    # The ensemble combines exactly the unimodal runs' test predictions.
    seed_dir = tmp_path / "seed_0"
    uni = {m: np.load(seed_dir / f"unimodal_{m}" / "predictions.npz") for m in ("x1", "x2")}
    ens = out["runs"]["ensemble"][0]["test"]["heads"]
    for m in ("x1", "x2"):
        assert ens[m] == out["runs"][f"unimodal {m}"][0]["test"]["heads"]["fused"]
    labels = uni["x1"]["test_labels"]
    from mcr_jax.methods import combine_logits

    fused = combine_logits([uni["x1"]["test_logits"], uni["x2"]["test_logits"]])
    assert ens["fused"]["accuracy"] == pytest.approx(np.mean(fused.argmax(-1) == labels))
    # Frozen uni-pre: its selected encoders are the unimodal runs' selected encoders.
    model = build_model(cfg.model, data_lib.load(cfg.data).info, seed=0)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    like = {"params": nnx.as_pure(params), "rest": nnx.as_pure(rest)}
    frozen = Checkpointer(str(seed_dir / "uni_pre_frozen")).restore_best(like)
    for m in ("x1", "x2"):
        pre = Checkpointer(str(seed_dir / f"unimodal_{m}")).restore_best(like)
        jax.tree.map(np.testing.assert_array_equal, frozen["params"]["encoders"][m], pre["params"]["encoders"][m])
    # Swapped pretrained folders never load the other modality's encoder.
    from mcr_jax.checkpoint import load_pretrained

    swapped = {"x1": str(seed_dir / "unimodal_x2"), "x2": str(seed_dir / "unimodal_x1")}
    with pytest.raises(ValueError, match=r"pretrained\['x1'\] = .*unimodal_x2 holds a 'unimodal' run of modality 'x2'"):
        load_pretrained(like["params"], like["rest"], swapped, ("x1", "x2"))


@pytest.mark.parametrize("seed", [0, 1])
def test_mipd_is_larger_for_the_modality_with_unique_information(seed, tmp_path):
    """The MIPD diagnostic: once trained, the modality that carries unique label information has the larger
    MIPD. Here x1 carries the label for every sample, x2 only for the shared 40 %."""
    cfg = synthetic.get_config("smoke")
    cfg.seed = seed
    cfg.data.update(num_train=400, num_validation=96, num_test=192, embedding_scale=(4.0, 4.0),
                    proportions=(0.4, 0.6, 0.0), seed=seed)
    cfg.model.hidden, cfg.model.latent_dim = (32,), 16
    cfg.train.update(num_epochs=15, batch_size=40, patience=0)
    cfg.optim.learning_rate = 3e-3
    cfg.eval.batch_size = 96
    cfg.parallel.num_devices = 1
    res = train.train_and_evaluate(cfg, str(tmp_path))
    assert res["test"]["heads"]["fused"]["accuracy"] > 0.6
    assert res["test"]["mipd"]["x1"] > 2 * res["test"]["mipd"]["x2"]


def test_eval_mipd_uses_every_valid_row_and_ignores_padding():
    """The diagnostic is computed on every split, padded final batches included (an evaluation batch
    larger than the split too), from fresh derangements of each batch's valid rows, and the padded
    rows' contents change nothing."""
    import jax.numpy as jnp

    from mcr_jax.losses import mipd_divergences, sample_permutations

    cfg = smoke_config()
    cfg.eval.batch_size = 48  # the 60 test rows: one full batch and one with 12 valid rows
    run = Programs.single(cfg)
    params, rest = take(run.states.params, 0), take(run.states.rest, 0)
    res, _ = evaluation.summarize(run.method, run.evaluate(run.states.params, run.states.rest, {}, "test"))
    assert set(res["mipd"]) == {"x1", "x2"}
    # Recomputed batch by batch with the pure loss, weighted by the valid rows.
    model = nnx.merge(run.graphdef_eval, params, rest)
    names, per_batch = run.method.modalities, []
    for i, batch in enumerate(run.batches("test", 48, train=False, epoch=0)):
        out = run.method.predict(model, batch)
        valid = batch["mask"] > 0
        key = jax.random.fold_in(jax.random.PRNGKey(EVAL_PERMUTATION_SEED), i)
        perms = sample_permutations(key, int(cfg.eval.mipd_samples), 48, valid=valid)
        assert not np.any((np.asarray(perms) == np.arange(48)) & np.asarray(valid))  # never a fixed point
        d = mipd_divergences(out["logits"], lambda xs: model.fuse(dict(zip(names, xs, strict=True))),
                             [out["latents"][m] for m in names], perms, mask=valid)
        per_batch.append((np.asarray(d), int(valid.sum())))
    assert [n for _, n in per_batch] == [48, 12]
    want = sum(d * n for d, n in per_batch) / 60
    np.testing.assert_allclose([res["mipd"]["x1"], res["mipd"]["x2"]], want, rtol=1e-5)
    # Padded rows hold anything: the diagnostic of the last batch does not move.
    last = list(run.batches("test", 48, train=False, epoch=0))[-1]
    noisy = dict(last)
    for m in names:
        noisy[m] = jnp.where((last["mask"] > 0)[:, None], last[m], 1e3 * jnp.ones_like(last[m]))
    a = run.eval_step(params, rest, last, jnp.int32(1))["mipd"]
    b = run.eval_step(params, rest, noisy, jnp.int32(1))["mipd"]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eval_mipd_reported_when_the_eval_batch_exceeds_the_split():
    cfg = smoke_config()
    cfg.eval.batch_size = 256  # > 60 test rows
    run = Programs.single(cfg)
    res, _ = evaluation.summarize(run.method, run.evaluate(run.states.params, run.states.rest, {}, "test"))
    assert set(res["mipd"]) == {"x1", "x2"} and all(v > 0 for v in res["mipd"].values())


@pytest.mark.parametrize("earliest", [0, 5])
def test_early_stopping_at_a_known_epoch_and_not_before_the_method_allows(earliest, tmp_path, monkeypatch):
    """Learning rate 1e-30 (0 is refused; updates this small leave float32 weights as they are): epoch 1
    is the best, every later epoch ties without improving, so patience 2
    stops after epoch 3 — or, for a method that says early stopping may act only from epoch 5, after 5."""
    from mcr_jax.methods.base import Method

    monkeypatch.setattr(Method, "earliest_stop_epoch", lambda self: earliest)
    cfg = smoke_config(num_epochs=8, patience=2, checkpoint=False)
    cfg.optim.learning_rate = 1e-30
    res = train.train_and_evaluate(cfg, str(tmp_path))
    assert res["stopped_early"] and res["best_epoch"] == 1
    assert res["epochs_run"] == max(3, earliest)


def test_reconboost_may_stop_only_after_every_modality_had_a_stage():
    import ml_collections

    from mcr_jax.methods import get_method

    info = data_lib.load(synthetic.get_config("smoke").data).info
    rb = get_method(ml_collections.ConfigDict({"name": "reconboost"}), info)
    assert rb.earliest_stop_epoch() == 12  # stage x1 (4) + rectify (4) + stage x2 (4)


def test_selection_ties_are_broken_by_validation_loss(tmp_path, monkeypatch):
    """Equal validation accuracy in epochs 1-3: the epoch with the lowest validation loss (2) wins."""
    real = evaluation.summarize
    losses = iter([1.0, 0.8, 0.9])

    def scripted(method, out, k=0):
        res, outputs = real(method, out, k)
        if scripted.calls < 3:  # the validation summaries of epochs 1-3 (then the final evaluation)
            scripted.calls += 1
            res["heads"]["fused"]["accuracy"] = 0.5
            res["loss"] = next(losses)
        return res, outputs

    scripted.calls = 0
    monkeypatch.setattr(evaluation, "summarize", scripted)
    res = train.train_and_evaluate(smoke_config(num_epochs=3, checkpoint=False), str(tmp_path))
    assert res["best_epoch"] == 2


def test_split_losses_are_per_example_means_of_the_saved_predictions(reference_run):
    """The reported validation/test losses are the mean cross-entropy over examples, recomputed
    here in NumPy from predictions.npz; the smoke config's evaluation batch (32) does not divide the
    60-row splits, so a per-batch mean would differ."""
    workdir, res = reference_run
    preds = np.load(os.path.join(workdir, "predictions.npz"))
    for split in ("validation", "test"):
        logits, labels = preds[f"{split}_logits"].astype(np.float64), preds[f"{split}_labels"]
        assert len(labels) % 32 != 0
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        want = -logp[np.arange(len(labels)), labels].mean()
        assert res[split]["loss"] == pytest.approx(want, rel=1e-5)


def test_selection_on_a_lower_is_better_metric_counts_bad_epochs_from_the_last_improvement(tmp_path, monkeypatch):
    """Selection on the validation loss (lower is better; its oriented value is negative), scripted to
    0.5, 0.6, 0.4, 0.45, 0.45 over 5 epochs with patience 2: epoch 3 is selected, its improvement resets
    the count of bad epochs, so the patience runs out only after the last epoch, which is no early stop;
    and the published results come from epoch 3's weights: their (real) validation loss is the one
    measured after epoch 3, not after epoch 5."""
    real = evaluation.summarize
    scripted_losses = [0.5, 0.6, 0.4, 0.45, 0.45]
    measured = []

    def scripted(method, out, k=0):
        res, outputs = real(method, out, k)
        if len(measured) < len(scripted_losses):  # the validation summaries of epochs 1-5 (then the final ones)
            measured.append(res["loss"])
            res["loss"] = scripted_losses[len(measured) - 1]
        return res, outputs

    monkeypatch.setattr(evaluation, "summarize", scripted)
    cfg = smoke_config(num_epochs=5, patience=2, checkpoint=False, select="loss")
    res = train.train_and_evaluate(cfg, str(tmp_path))
    assert res["selection"] == "val_loss"
    assert (res["best_epoch"], res["epochs_run"], res["stopped_early"]) == (3, 5, False)
    assert len(set(measured)) == 5  # the weights moved every epoch: the epochs' real losses differ
    assert res["validation"]["loss"] == pytest.approx(measured[2], rel=1e-6)
