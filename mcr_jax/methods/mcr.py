r"""MCR: the Multimodal Competition Regularizer.

.. math::
   L = \mathrm{CE}(\ell, y) + \lambda_{uni}\sum_m \mathrm{CE}(u_m, y) + \lambda_{Con} L_{Con}
       + \lambda_{CEB} L_{CEB} - \lambda_M \sum_m D_m \quad(\text{gradients of the last term shaped by the game})

Config (``method`` section; defaults are the reference's CREMA-D values):

- ``strategy``: ``"greedy"`` | ``"independent"`` | ``"collaborative"``; ``game_form``:
  ``"single_backward"`` (default, one backward pass) or ``"optax"`` (per-term gradients combined by
  :func:`mcr_jax.game.competition`; slower, inspectable).
- ``mipd_weight`` (λ_M 0.1), ``uni_weight`` (λ_uni 0.01), ``con_weight`` (λ_Con 1.0),
  ``ceb_weight`` (λ_CEB 0.0; needs ``model.ceb = True``).
- ``num_permutations`` (S 32), ``derangement`` (True: no row is paired with itself, so the estimate is
  the uniform-permutation MIPD times ``B / (B - 1)``; False: the reference's uniform permutations,
  fixed points included), ``permutation_method`` (``"shift"``),
  ``permutation_scope``: ``"global"`` (default: partners drawn from the whole global batch, the
  same estimator on 1 or 256 devices) or ``"local"`` (each device permutes its own shard under
  ``jax.shard_map``; moves no data between devices, but partners come from the device's rows only;
  it needs ``derangement=True``, under which its expectation is the global one for exchangeable
  rows, whatever the device count — with fixed points allowed it would shrink by
  ``(1 - 1/B_local) / (1 - 1/B)``).
- ``perturbation``: ``"permute"`` | ``"noise"`` | ``"zero"``; ``perturb_space``: ``"latent"`` |
  ``"input"`` (noise/zero on the inputs, re-encoded ``S`` times in evaluation mode);
  ``noise_scale``.
- ``permuted_source``: ``"same_pass"`` (paper, default) or ``"eval_pass"`` (the reference's
  2-modality model: a second encoder pass in evaluation mode supplies every latent of the perturbed
  predictions, the permuted one and the kept ones; the clean prediction stays the training pass's).
- ``branch_fast_path`` (True): with linear late fusion, permute branch logits ``z_m W_m``.
- ``con_form`` (``"ntxent"`` | ``"cross_modal"``), ``temperature`` (0.5), ``con_labels``
  (``"binary"`` | ``"raw"``, regression only), ``ceb_condition`` (``"logits"`` | ``"label"``).
- ``grad_norms`` (False): a diagnostic. Each step also reports, per loss term (``task``, ``uni``,
  ``con``, ``ceb``, ``mipd``: each as weighted in the loss, MIPD after the game) and per player, the
  L2 norm of that term's gradient on the player's parameters (encoder and own fusion branch), as
  the training metrics ``gnorm_<term>_<modality>``; this shows whether the MIPD gradient reaches the
  weak encoder and how it compares with the task gradient. It costs one backward pass per term;
  single-backward form only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mcr_jax import game, parallel
from mcr_jax.losses import CONTRASTIVE, binarize_regression_labels, ceb_term, mipd_divergences, sample_permutations
from mcr_jax.losses.mipd import perturb_latent
from mcr_jax.methods.base import Method, model_inputs, unimodal_losses
from mcr_jax.models.fusion import is_separable
from mcr_jax.state import StepOutput

#: the weighted loss terms of the ``grad_norms`` diagnostic, in order
GRAD_NORM_TERMS = ("task", "uni", "con", "ceb", "mipd")
#: the tuning grid of a study (mcr_jax.study): values around the reference CREMA-D / AVE / UCF settings.
GRID = dict(mipd_weight=[0.001, 0.01, 0.1, 1.0], uni_weight=[0.01, 0.1, 1.0], con_weight=[0.1, 1.0])
DEFAULTS = dict(
    strategy="greedy",
    game_form="single_backward",
    mipd_weight=0.1,
    uni_weight=0.01,
    con_weight=1.0,
    ceb_weight=0.0,
    num_permutations=32,
    derangement=True,
    permutation_method="shift",
    permutation_scope="global",
    perturbation="permute",
    perturb_space="latent",
    noise_scale=1.0,
    permuted_source="same_pass",
    branch_fast_path=True,
    con_form="ntxent",
    temperature=0.5,
    con_labels="binary",
    ceb_condition="logits",
    grad_norms=False,
)


class MCR(Method):
    name = "mcr"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        o = self.opts
        #: the strategy resolved once to its (k, s) pair
        self.game = game.resolve_strategy(o["strategy"])
        if o["game_form"] not in ("single_backward", "optax"):
            raise ValueError(f"method.game_form must be 'single_backward' or 'optax'; got {o['game_form']!r}.")
        if o["permuted_source"] not in ("same_pass", "eval_pass"):
            raise ValueError(
                f"method.permuted_source must be 'same_pass' or 'eval_pass'; got {o['permuted_source']!r}.")
        if o["perturb_space"] not in ("latent", "input"):
            raise ValueError(f"method.perturb_space must be 'latent' or 'input'; got {o['perturb_space']!r}.")
        if o["perturb_space"] == "input" and o["perturbation"] == "permute":
            raise ValueError("perturb_space 'input' takes perturbation 'noise' or 'zero' (a permuted input "
                             "re-encoded is a permuted latent: use perturb_space 'latent').")
        if o["permutation_scope"] not in ("global", "local"):
            raise ValueError(f"method.permutation_scope must be 'global' or 'local'; got {o['permutation_scope']!r}.")
        if o["con_form"] not in CONTRASTIVE:
            raise ValueError(f"method.con_form must be one of {sorted(CONTRASTIVE)}; got {o['con_form']!r}.")
        if o["permutation_scope"] == "local" and not o["derangement"]:
            raise ValueError("method.permutation_scope='local' needs method.derangement=True: with fixed points "
                             "allowed the expected MIPD shrinks by (1 - 1/B_local) / (1 - 1/B), so λ_M would "
                             "depend on the device count.")
        if not float(o["temperature"]) > 0:
            raise ValueError(f"method.temperature (the contrastive τ) must be > 0; got {o['temperature']!r}.")
        if o["grad_norms"] and o["game_form"] != "single_backward":
            raise ValueError("method.grad_norms (the per-term gradient-norm diagnostic) needs "
                             "game_form='single_backward'.")
        if int(o["num_permutations"]) < 1:
            raise ValueError(f"method.num_permutations (S) must be >= 1; got {o['num_permutations']}.")
        self.divergence = self.task.divergence
        # λ's that may be traced (a grid as one program); the optax form's λ_M lives in its optimizer
        self.traceable = (("mipd_weight",) if o["game_form"] == "single_backward" else ()) + (
            "uni_weight", "con_weight", "ceb_weight")

    def vectorizable(self) -> tuple[bool, str]:
        """Not vectorisable with ``permutation_scope="local"``: the step runs under ``shard_map``."""
        if self.opts["permutation_scope"] == "local":
            return False, "MCR's local permutation scope runs under shard_map"
        return True, ""

    def check_model(self, model) -> None:
        o = self.opts
        if o["con_weight"] and len(set(model.latent_dims.values())) != 1:
            raise ValueError(f"the contrastive term compares latents by cosine similarity and needs equal latent "
                             f"dimensions; got {model.latent_dims}. Set equal latent sizes or method.con_weight=0.")
        if o["ceb_weight"] and model.ceb_decoder is None:
            raise ValueError("method.ceb_weight > 0 needs the CEB decoder: set model.ceb = True.")

    def make_optimizer(self, base, params):
        if self.opts["game_form"] != "optax":
            return base
        players = game.assign_players(params, self.modalities)
        return game.competition(base, players=players, strategy=self.game,
                                weight=float(self.opts["mipd_weight"]))

    # ---- pieces ------------------------------------------------------------------------------
    def _regularisers(self, model, out, batch):
        """Task + unimodal + contrastive + CEB terms (everything but MIPD)."""
        o, mask, labels = self.opts, batch.get("mask"), batch["label"]
        terms = {"task": self.task.loss(out["logits"], labels, mask)}
        total = terms["task"]
        if o["uni_weight"] or self.tuned("uni_weight"):
            uni = unimodal_losses(out, batch, self.task, self.modalities)
            terms.update({f"uni_{m}": v for m, v in uni.items()})
            total = total + self.hp("uni_weight", o["uni_weight"]) * sum(uni.values())
        zs = [out["latents"][m] for m in self.modalities]
        if o["con_weight"] or self.tuned("con_weight"):
            con_labels = labels
            if not self.task.categorical and o["con_labels"] == "binary":
                con_labels = binarize_regression_labels(labels)
            terms["con"] = CONTRASTIVE[o["con_form"]](zs, con_labels, temperature=o["temperature"], mask=mask)
            total = total + self.hp("con_weight", o["con_weight"]) * terms["con"]
        if o["ceb_weight"] or self.tuned("ceb_weight"):
            terms["ceb"] = ceb_term(zs, model.ceb_decoder, condition=o["ceb_condition"], fused_logits=out["logits"],
                                    labels=labels, num_classes=self.info.num_classes, mask=mask)
            total = total + self.hp("ceb_weight", o["ceb_weight"]) * terms["ceb"]
        return total, terms

    def _fast_path(self, model) -> bool:
        return (bool(self.opts["branch_fast_path"]) and is_separable(model.fusion)
                and self.opts["perturb_space"] == "latent")

    def _mipd_parts(self, handle, params, model, batch, out, key, fusion):
        """(clean parts, fuse_fn over parts, extra kwargs for mipd_divergences)."""
        o, names = self.opts, self.modalities
        fast = self._fast_path(model)

        def to_parts(latents):
            return model.fusion.branch_logits(latents) if fast else latents

        def fuse_with(f):
            if fast:
                return lambda xs: f.combine(dict(zip(names, xs, strict=True)))
            return lambda xs: f(dict(zip(names, xs, strict=True)))

        fuse = [fuse_with(f) for f in fusion] if isinstance(fusion, list) else fuse_with(fusion)
        parts = to_parts(out["latents"])
        kwargs = {}
        key_perm, key_noise = jax.random.split(key)
        batch_size = batch["label"].shape[0]
        if o["perturb_space"] == "input":
            kwargs["perturbed_latents"] = self._input_perturbed(handle, params, batch, key_noise)
            kwargs["num_samples"] = int(o["num_permutations"])
            return [parts[m] for m in names], fuse, kwargs
        if o["permuted_source"] == "eval_pass":  # the perturbed predictions are built from this pass only
            inputs, masks = model_inputs(batch, names)
            parts = to_parts(handle.eval_model(params).encode(inputs, masks))
        if o["perturbation"] == "permute" and o["permutation_scope"] == "local":
            kwargs["perturbed_latents"] = self._local_permuted([parts[m] for m in names], key_perm, batch_size,
                                                               handle.mesh)
        elif o["perturbation"] == "permute":
            kwargs["permutations"] = sample_permutations(key_perm, int(o["num_permutations"]), batch_size,
                                                         derangement=bool(o["derangement"]),
                                                         method=o["permutation_method"])
        else:
            kwargs.update(perturbation=o["perturbation"], key=key_noise, num_samples=int(o["num_permutations"]),
                          noise_scale=float(o["noise_scale"]))
        return [parts[m] for m in names], fuse, kwargs

    def _local_permuted(self, sources, key, batch_size, mesh):
        """Each device permutes its own rows (shard_map; no data moves between devices); one shard
        without a mesh."""
        o = self.opts
        shards = 1 if mesh is None else mesh.devices.size
        perms = parallel.sample_local_permutations(key, int(o["num_permutations"]), batch_size, shards,
                                                   derangement=bool(o["derangement"]),
                                                   method=o["permutation_method"])
        if mesh is None:
            return [z[perms] for z in sources]
        return [parallel.local_permute(mesh, z, perms) for z in sources]

    def _input_perturbed(self, handle, params, batch, key):
        """Latents of S noisy/zeroed copies of each modality's input, encoded in evaluation mode."""
        o, names = self.opts, self.modalities
        eval_model = handle.eval_model(params)
        inputs, masks = model_inputs(batch, names)
        s = int(o["num_permutations"])
        out = []
        for m, k in zip(names, jax.random.split(key, len(names)), strict=True):
            x = inputs[m]
            xs = perturb_latent(x, kind=o["perturbation"], key=k, num_samples=s, noise_scale=float(o["noise_scale"]))
            flat = xs.reshape((s * x.shape[0],) + x.shape[1:])
            mask = None if masks is None else masks.get(m)
            enc = eval_model.encoders[m]
            if getattr(enc, "accepts_mask", False):
                mask_rep = None if mask is None else jnp.tile(mask, (s,) + (1,) * (mask.ndim - 1))
                z = enc(flat, mask=mask_rep)
            else:
                z = enc(flat)
            out.append(z.reshape((s, x.shape[0]) + z.shape[1:]))
        return out

    def _game_fusions(self, model, fast: bool):
        """Fusion head(s) for the single-backward form: the shared bias scaled by s(k) on the fast
        path (branch logits already carry W_m); otherwise one copy per term with player-owned fusion
        parameters scaled by k (W_m follows θ_m) and unowned ones by s(k)."""
        strategy = self.game
        graphdef, fparams, frest = nnx.split(model.fusion, nnx.Param, ...)
        fparams = nnx.as_pure(fparams)
        players = game.assign_players(fparams, self.modalities, require_all=False)
        if fast:
            return nnx.merge(graphdef, game.scale_shared_params(fparams, players, strategy), frest)
        return [nnx.merge(graphdef, game.scale_params_for_term(fparams, players, j, strategy), frest)
                for j in range(len(self.modalities))]

    @staticmethod
    def _jsd_metrics(names, d):
        return {f"mipd_{m}": d[i] for i, m in enumerate(names)}

    # ---- the two game forms ------------------------------------------------------------------
    def loss(self, handle, params, batch, key, method_state):
        """Single-backward form: one backward pass yields the game's gradients."""
        model = handle.train_model(params)
        out = self.forward(model, batch)
        total, terms = self._regularisers(model, out, batch)
        fusion = self._game_fusions(model, self._fast_path(model))
        parts, fuse, kw = self._mipd_parts(handle, params, model, batch, out, key, fusion)
        d = game.game_mipd_divergences(out["logits"], fuse, parts, strategy=self.game,
                                       divergence=self.divergence, **kw)
        total = total - self.hp("mipd_weight", self.opts["mipd_weight"]) * jnp.sum(d)
        return total, {**terms, **self._jsd_metrics(self.modalities, d)}, model

    def _weighted_terms(self, handle, params, batch, key, method_state):
        """The loss split into its weighted terms ``[task, uni, con, ceb, mipd]`` (they sum to it)."""
        total, terms, _ = self.loss(handle, params, batch, key, method_state)
        names = self.modalities
        uni = sum((terms[f"uni_{m}"] for m in names if f"uni_{m}" in terms), jnp.zeros(()))
        parts = [terms["task"], self.hp("uni_weight", self.opts["uni_weight"]) * uni,
                 self.hp("con_weight", self.opts["con_weight"]) * terms.get("con", jnp.zeros(())),
                 self.hp("ceb_weight", self.opts["ceb_weight"]) * terms.get("ceb", jnp.zeros(()))]
        return jnp.stack(parts + [total - sum(parts)])

    def _gradient_norms(self, handle, params, batch, key, method_state) -> dict:
        """``{gnorm_<term>_<m>: ||∂ term / ∂ θ_m||}``: per weighted term, per player (its encoder
        and own fusion branch), the norm of the gradient the step applies (MIPD: after the game)."""
        jac = jax.jacrev(self._weighted_terms, argnums=1)(handle, params, batch, key, method_state)
        players = game.assign_players(params, self.modalities, require_all=False)
        out = {}
        for i, m in enumerate(self.modalities):
            sq = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
                     for g, owner in zip(jax.tree.leaves(jac), jax.tree.leaves(players), strict=True) if owner == i)
            for t, term in enumerate(GRAD_NORM_TERMS):
                out[f"gnorm_{term}_{m}"] = jnp.sqrt(sq[t])
        return out

    def gradients(self, handle, params, batch, key, method_state):
        if self.opts["game_form"] != "optax":
            step = super().gradients(handle, params, batch, key, method_state)
            if not self.opts["grad_norms"]:
                return step
            norms = self._gradient_norms(handle, params, batch, key, method_state)
            return step._replace(metrics={**step.metrics, **norms})
        o = self.opts
        s = self.game.s

        def rest_fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            reg_total, terms = self._regularisers(model, out, batch)
            total = reg_total
            if s:  # the clean-prediction path of the MIPD terms belongs to the ordinary gradient
                parts, fuse, kw = self._mipd_parts(handle, p, model, batch, out, key, model.fusion)
                d = mipd_divergences(out["logits"], fuse, parts, divergence=self.divergence, stop_perturbed=True, **kw)
                total = total - o["mipd_weight"] * s * jnp.sum(d)
            return total, (reg_total, terms, handle.rest_of(model))

        def terms_fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            parts, fuse, kw = self._mipd_parts(handle, p, model, batch, out, key, model.fusion)
            d = mipd_divergences(jax.lax.stop_gradient(out["logits"]), fuse, parts, divergence=self.divergence, **kw)
            return -d, d

        (_, (reg_total, terms, new_rest)), grads = jax.value_and_grad(rest_fn, has_aux=True)(params)
        per_term, d = jax.jacrev(terms_fn, has_aux=True)(params)
        metrics = {**terms, **self._jsd_metrics(self.modalities, d), "loss": reg_total - o["mipd_weight"] * jnp.sum(d)}
        return StepOutput(grads, {"mipd_grads": per_term}, new_rest, method_state, metrics)
