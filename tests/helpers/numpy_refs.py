"""Slow, obvious float64 NumPy versions of every formula the library implements, for the tests to compare with."""

from __future__ import annotations

import numpy as np


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(p, q):
    """KL(P||Q) of two probability vectors, with 0 log 0 = 0."""
    out = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            out += pi * np.log(pi / qi)
    return out


def jsd_rows(p_logits, q_logits):
    p_logits = np.asarray(p_logits, np.float64)
    q_logits = np.asarray(q_logits, np.float64)
    flat_p = p_logits.reshape(-1, p_logits.shape[-1])
    flat_q = q_logits.reshape(-1, q_logits.shape[-1])
    out = []
    for a, b in zip(flat_p, flat_q, strict=True):
        p, q = softmax(a), softmax(b)
        m = 0.5 * (p + q)
        out.append(0.5 * kl(p, m) + 0.5 * kl(q, m))
    return np.array(out).reshape(p_logits.shape[:-1])


def kl_rows(p_logits, q_logits):
    p_logits = np.asarray(p_logits, np.float64)
    flat_p = p_logits.reshape(-1, p_logits.shape[-1])
    flat_q = np.asarray(q_logits, np.float64).reshape(-1, p_logits.shape[-1])
    return np.array([kl(softmax(a), softmax(b)) for a, b in zip(flat_p, flat_q, strict=True)]).reshape(
        p_logits.shape[:-1]
    )


def mipd(clean_logits, fuse, latents, perms, divergence="jsd"):
    """D_m by explicit loops over modalities, permutations and rows."""
    latents = [np.asarray(z, np.float64) for z in latents]
    clean_logits = np.asarray(clean_logits, np.float64)
    out = []
    for m in range(len(latents)):
        vals = []
        for perm in np.asarray(perms):
            for b in range(clean_logits.shape[0]):
                row = [z[b] for z in latents]
                row[m] = latents[m][perm[b]]
                q = fuse([r[None] for r in row])[0]
                if divergence == "jsd":
                    vals.append(jsd_rows(clean_logits[b], q))
                else:
                    vals.append(np.mean((clean_logits[b] - q) ** 2))
        out.append(np.mean(vals))
    return np.array(out)


def normalize(z):
    z = np.asarray(z, np.float64)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def ntxent(latents, labels, temperature, mask=None):
    """Reference NT-Xent: one term per positive pair, brute force."""
    b = len(labels)
    mask = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
    rows, labs = [], []
    for z in latents:
        zn = normalize(z)
        for i in range(b):
            if mask[i]:
                rows.append(zn[i])
                labs.append(labels[i])
    terms = []
    for a in range(len(rows)):
        for p in range(len(rows)):
            if a == p or labs[a] != labs[p]:
                continue
            s_ap = rows[a] @ rows[p] / temperature
            denom = np.exp(s_ap)
            for n in range(len(rows)):
                if labs[n] != labs[a]:
                    denom += np.exp(rows[a] @ rows[n] / temperature)
            terms.append(-np.log(np.exp(s_ap) / denom))
    return float(np.mean(terms)) if terms else 0.0


def cross_modal_supcon(latents, labels, temperature, mask=None):
    b = len(labels)
    mask = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
    normed = [normalize(z) for z in latents]
    pair_losses = []
    for ma in range(len(latents)):
        for mb in range(len(latents)):
            if ma == mb:
                continue
            anchor_losses = []
            for i in range(b):
                if not mask[i]:
                    continue
                cands = [j for j in range(b) if mask[j]]
                logits = np.array([normed[ma][i] @ normed[mb][j] / temperature for j in cands])
                log_den = np.log(np.sum(np.exp(logits)))
                pos = [c for c, j in enumerate(cands) if labels[j] == labels[i]]
                if pos:
                    anchor_losses.append(-np.mean([logits[c] - log_den for c in pos]))
            pair_losses.append(np.mean(anchor_losses) if anchor_losses else 0.0)
    return float(np.mean(pair_losses))


def ceb(latents, decoded, mask=None):
    target = np.concatenate([np.asarray(z, np.float64) for z in latents], axis=-1)
    per_row = np.mean((target - np.asarray(decoded, np.float64)) ** 2, axis=-1)
    if mask is None:
        return float(per_row.mean())
    mask = np.asarray(mask, np.float64)
    return float((per_row * mask).sum() / mask.sum())
