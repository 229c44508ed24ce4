"""A one-minute demonstration of the MCR losses and the competition game in a plain JAX loop.

Two modalities: modality 0 carries the label for every sample (easy, dominant); modality 1 carries
it only for a third of the samples, through a different, noisier signal. A linear-late-fusion model
is trained with the full MCR objective (single-backward game, greedy) and the per-epoch values of
every term are printed. Run:  python -m experiments.demo
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mcr_jax
from mcr_jax import losses

NAMES = ("m0", "m1")


def make_data(n, seed, classes=4, dim=16):
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, size=n)
    means0, means1 = r.normal(size=(classes, dim)) * 1.5, r.normal(size=(classes, dim)) * 1.5
    x0 = r.normal(size=(n, dim)) + means0[y]
    carries = r.random(n) < 1 / 3
    x1 = r.normal(size=(n, dim)) + np.where(carries[:, None], means1[y], 0.0)
    return {"m0": x0.astype(np.float32), "m1": x1.astype(np.float32)}, y.astype(np.int32)


def init_params(key, dim=16, latent=8, classes=4):
    ks = jax.random.split(key, 6)
    dense = lambda k, a, b: jax.random.normal(k, (a, b)) / np.sqrt(a)
    return {
        "encoders": {m: dense(ks[i], dim, latent) for i, m in enumerate(NAMES)},
        "heads": {m: dense(ks[2 + i], latent, classes) for i, m in enumerate(NAMES)},
        "fusion": {"branches": {m: dense(ks[4 + i], latent, classes) for i, m in enumerate(NAMES)},
                   "bias": jnp.zeros((classes,))},
    }


def make_step(tx, players, *, weight_mipd, weight_uni, weight_con, num_perms, strategy):
    def loss_fn(params, x, y, key):
        zs = [jax.nn.relu(x[m] @ params["encoders"][m]) for m in NAMES]
        branches = [z @ params["fusion"]["branches"][m] for z, m in zip(zs, NAMES, strict=True)]
        logits = sum(branches) + params["fusion"]["bias"][None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        uni = sum(optax.softmax_cross_entropy_with_integer_labels(z @ params["heads"][m], y).mean()
                  for z, m in zip(zs, NAMES, strict=True))
        con = losses.supervised_ntxent(zs, y, temperature=0.5)
        shared_bias = mcr_jax.scale_shared_params(params["fusion"]["bias"], players["fusion"]["bias"], strategy)
        perms = losses.sample_permutations(key, num_perms, y.shape[0])
        jsd = mcr_jax.game_mipd_divergences(
            logits, lambda bs: sum(bs) + shared_bias[None], branches, perms, strategy=strategy
        )
        total = ce + weight_uni * uni + weight_con * con - weight_mipd * jnp.sum(jsd)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return total, {"ce": ce, "uni_ce": uni, "con": con, "jsd_m0": jsd[0], "jsd_m1": jsd[1], "acc": acc}

    @jax.jit
    def step(params, opt_state, x, y, key):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    return step


NUM_SAMPLES = 2048


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=_positive, default=10, help="Training epochs (>= 1).")
    parser.add_argument("--batch-size", type=_positive, default=64,
                        help=f"Samples per step (1 … {NUM_SAMPLES}, the demo's training set).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the weights and the permutations.")
    parser.add_argument("--strategy", default="greedy", choices=sorted(mcr_jax.STRATEGIES),
                        help="The competition game's strategy.")
    args = parser.parse_args(argv)
    if args.batch_size > NUM_SAMPLES:
        parser.error(f"--batch-size must be at most {NUM_SAMPLES} (the demo's training set); got {args.batch_size}")

    x, y = make_data(NUM_SAMPLES, args.seed)
    params = init_params(jax.random.key(args.seed))
    players = mcr_jax.assign_players(params, NAMES)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    step = make_step(tx, players, weight_mipd=0.1, weight_uni=0.01, weight_con=1.0, num_perms=32,
                     strategy=args.strategy)
    key = jax.random.key(args.seed + 1)
    steps = len(y) // args.batch_size
    print(f"MCR demo: 2 modalities, linear late fusion, game={args.strategy}, S=32, {steps} steps/epoch")
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(y))
        sums = {}
        for i in range(steps):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            key, sub = jax.random.split(key)
            params, opt_state, aux = step(params, opt_state, {m: x[m][idx] for m in NAMES}, y[idx], sub)
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + float(v) / steps
        line = "  ".join(f"{k} {v:.4f}" for k, v in sums.items())
        print(f"epoch {epoch:2d}  {line}  ({time.perf_counter() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
