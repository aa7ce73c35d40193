#!/usr/bin/python3
"""PyTorch reference for the MoE byte LM, used by tests/test_parity_moe.c.

For each case directory given on the command line, reads
  init.h5        a cmoe checkpoint (the initial parameters, by name, with
                 their frozen / no_decay attributes),
  batch.bin      int32 [B, T+1] token windows,
  settings.json  the model, router and AdamW settings,
  noise.bin      (with "noise": "learned") float32 [steps, layers, B*T, E]:
                 the standard normal draws of the router noise, written by
                 the C test from the keys cmoe uses,
rebuilds the model in float64 PyTorch, runs `steps` training steps
(loss = cross-entropy + the routers' auxiliary losses, then AdamW), and writes
reference.h5 with
  losses, ce, aux [steps]                   total loss and its two parts
  grads/step{s}/NAME                        every parameter's gradient at step s
                                            (zeros for a frozen parameter)
  params_after/NAME                         the parameters after all steps
  routing/counts [steps, layers, E] int     kept (token, expert) pairs per expert
  routing/k [steps] int                     the k in effect (0 for top-p)
  routing/margin [steps, layers]            the smallest distance of any routing
                                            decision from flipping (see below)
One process handles every case, so torch is imported once.

The routing is written from the method descriptions (METHODS.md sections
0.1-0.3, 1.2, 3.1-3.2; docs), not from cmoe's C code:
  topk          top-k of the logits, ties to the lowest expert index; gates
                either the chosen softmax probabilities (softmax_topk) or a
                softmax over the chosen logits (topk_softmax); Switch loss
                coef * E * sum_i f_i P_i with f_i = count_i / (k T), P_i the mean
                probability; z-loss coef * mean_t logsumexp(z_t)^2.
  smoe_dropout  frozen router (no gradient, not in the optimizer),
                topk_softmax, k from the linear_increase schedule
                round((k_max - k_min) * step / S) + k_min, no auxiliary loss.
  top_p         probabilities sorted descending (ties: lower index first);
                keep while the cumulative mass is <= p, plus the first expert
                that passes it; gates are the raw probabilities; balance loss
                coef * E * sum_i f_i P_i with f_i = count_i / (all kept pairs)
                (top_p.c documents that normalisation); entropy loss
                coef * mean_t H(p_t).
  noise learned (any of the above with a learned router): the noisy top-k
                gating of Shazeer et al. (2017), H = x W^T (+ b) +
                n * softplus(x W_noise^T), W_noise = ROUTER.noise_weight, n the
                given draws (constants); the selection, the gates and the
                losses then use H in place of the logits.
Gradients reach the router only through the gates and the losses, never
through the selection (which is computed on detached values).
Experts (settings "activation"): gelu (tanh form), w2 gelu(w1 h + b1) + b2;
swiglu (the top-p paper's LLaMA MLP: gate_proj w1, up_proj w3, down_proj w2,
with the biases cmoe declares) w2 (silu(w1 h + b1) * (w3 h + b3)) + b2.
"""
import json
import math
import os
import sys

import h5py
import numpy as np
import torch
import torch.nn.functional as F


def linear_increase_k(schedule, step):
    """SMoE-Dropout's calculate_gate_number, mode linear_increase."""
    k_min, k_max, total = schedule["k_min"], schedule["k_max"], schedule["total_steps"]
    k = round((k_max - k_min) * step / total) + k_min  # Python round: half to even
    return max(k_min, min(k_max, k))


def select(logits, probs, cfg, k):
    """Discrete routing on detached float64 values.

    logits, probs [T,E] -> mask [T,E] (1 = kept) and the smallest margin: how
    far the closest decision is from going the other way (a gap between two
    scores that must stay ordered, or a cumulative mass minus the threshold).
    """
    z = logits.detach().numpy()
    p = probs.detach().numpy()
    tokens, experts = z.shape
    mask = np.zeros((tokens, experts))
    margin = math.inf
    for t in range(tokens):
        if cfg["router"] == "top_p":
            order = np.argsort(-p[t], kind="stable")  # descending, ties: lower index first
            cumulative = np.cumsum(p[t][order])
            keep = experts
            for j in range(experts):
                if cumulative[j] > cfg["top_p"]:
                    keep = j + 1
                    break
            if keep < experts or cumulative[-1] > cfg["top_p"]:
                margin = min(margin, cumulative[keep - 1] - cfg["top_p"])
            if keep >= 2:
                margin = min(margin, cfg["top_p"] - cumulative[keep - 2])
            if keep < experts:
                margin = min(margin, p[t][order[keep - 1]] - p[t][order[keep]])
        else:
            order = np.argsort(-z[t], kind="stable")
            keep = k
            if k < experts:
                margin = min(margin, z[t][order[k - 1]] - z[t][order[k]])
        mask[t, order[:keep]] = 1.0
    return torch.tensor(mask), margin


def moe_layer(params, prefix, h, cfg, k, noise):
    """h [T,D], noise [T,E] draws or None -> (out [T,D], aux [scalar] or None,
    counts [E], margin)."""
    weight = params[prefix + "router.weight"]
    logits = h @ weight.T
    if prefix + "router.bias" in params:
        logits = logits + params[prefix + "router.bias"]
    if cfg["noise"] == "learned":
        noise_std = F.softplus(h @ params[prefix + "router.noise_weight"].T)
        logits = logits + noise * noise_std
    elif cfg["noise"] != "none":
        sys.exit("moe_parity.py: noise %r is not implemented here" % cfg["noise"])
    probs = logits.softmax(-1)
    mask, margin = select(logits, probs, cfg, k)
    gating = "topk_softmax" if cfg["router"] == "smoe_dropout" else cfg["gating"]
    if cfg["router"] == "top_p" or gating == "softmax_topk":
        gates = probs * mask
    else:
        gates = logits.masked_fill(mask == 0, float("-inf")).softmax(-1)

    w1, b1 = params[prefix + "experts.w1"], params[prefix + "experts.b1"]
    w2, b2 = params[prefix + "experts.w2"], params[prefix + "experts.b2"]
    out = torch.zeros_like(h)
    for e in range(w1.shape[0]):
        rows = mask[:, e].nonzero().flatten()
        if rows.numel() == 0:
            continue
        if cfg["activation"] == "swiglu":
            w3, b3 = params[prefix + "experts.w3"], params[prefix + "experts.b3"]
            hidden = F.silu(h[rows] @ w1[e].T + b1[e]) * (h[rows] @ w3[e].T + b3[e])
        else:
            hidden = F.gelu(h[rows] @ w1[e].T + b1[e], approximate="tanh")
        y = hidden @ w2[e].T + b2[e]
        out = out.index_add(0, rows, gates[rows, e : e + 1] * y)

    counts = mask.sum(0)
    tokens, experts = mask.shape
    mean_probs = probs.mean(0)
    aux = None

    def add(term):
        nonlocal aux
        aux = term if aux is None else aux + term

    if cfg["router"] == "topk":
        if cfg["aux_coef"]:
            f = counts / (k * tokens)
            add(cfg["aux_coef"] * experts * (f * mean_probs).sum())
        if cfg["z_coef"]:
            add(cfg["z_coef"] * (torch.logsumexp(logits, -1) ** 2).mean())
    elif cfg["router"] == "top_p":
        if cfg["aux_coef"]:
            f = counts / counts.sum()
            add(cfg["aux_coef"] * experts * (f * mean_probs).sum())
        if cfg["entropy_coef"]:
            entropy = -(probs * probs.log()).sum(-1).mean()
            add(cfg["entropy_coef"] * entropy)
    return out, aux, counts, margin


def forward(params, ids, cfg, k, routing, noise):
    """ids [B,T] -> (logits [B*T,V], aux or None); appends per-layer routing.
    noise: [layers, B*T, E] draws of this step, or None."""
    batch, seq = ids.shape
    n_head, eps = cfg["heads"], cfg["layernorm_eps"]
    x = params["wte"][ids] + params["wpe"][:seq]
    d = x.shape[-1]
    dh = d // n_head
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    aux_total = None
    for layer in range(cfg["layers"]):
        prefix = f"blocks.{layer}."
        p = lambda name: params[prefix + name]
        h = F.layer_norm(x, (d,), p("ln1.weight"), p("ln1.bias"), eps)
        qkv = h @ p("attn.qkv.weight").T + p("attn.qkv.bias")
        q, key, v = qkv.split(d, dim=-1)
        heads = lambda t: t.view(batch, seq, n_head, dh).transpose(1, 2)
        scores = heads(q) @ heads(key).transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~mask, float("-inf"))
        attended = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(batch, seq, d)
        x = x + attended @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, (d,), p("ln2.weight"), p("ln2.bias"), eps)
        layer_noise = None if noise is None else noise[layer]
        out, aux, counts, margin = moe_layer(
            params, prefix + "moe.", h.reshape(-1, d), cfg, k, layer_noise
        )
        routing.append((counts.numpy(), margin))
        if aux is not None:
            aux_total = aux if aux_total is None else aux_total + aux
        x = x + out.reshape(batch, seq, d)
    x = F.layer_norm(x, (d,), params["ln_f.weight"], params["ln_f.bias"], eps)
    return (x @ params["head.weight"].T).reshape(batch * seq, -1), aux_total


def run_case(directory):
    with open(os.path.join(directory, "settings.json")) as f:
        cfg = json.load(f)
    params, decay, frozen = {}, {}, {}
    with h5py.File(os.path.join(directory, "init.h5"), "r") as f:
        for name, dataset in f["params"].items():
            # The method's rule, not the checkpoint's frozen attribute: the C
            # test checks that cmoe froze exactly these.
            frozen[name] = cfg["router"] == "smoe_dropout" and ".moe.router." in name
            params[name] = torch.tensor(
                np.asarray(dataset, dtype=np.float64), requires_grad=not frozen[name]
            )
            decay[name] = not bool(dataset.attrs.get("no_decay", 0))
    raw = np.fromfile(os.path.join(directory, "batch.bin"), dtype=np.int32)
    raw = raw.reshape(cfg["batch"], cfg["seq"] + 1)
    ids = torch.tensor(raw[:, :-1], dtype=torch.long)
    noise = None
    if cfg["noise"] != "none":
        draws = np.fromfile(os.path.join(directory, "noise.bin"), dtype=np.float32)
        draws = draws.reshape(cfg["steps"], cfg["layers"], cfg["batch"] * cfg["seq"], -1)
        noise = torch.tensor(draws.astype(np.float64))
    targets = torch.tensor(raw[:, 1:], dtype=torch.long).reshape(-1)

    names = sorted(params)
    trainable = [n for n in names if not frozen[n]]  # frozen: never seen by the optimizer
    groups = [
        {"params": [params[n] for n in trainable if decay[n]], "weight_decay": cfg["weight_decay"]},
        {"params": [params[n] for n in trainable if not decay[n]], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"]
    )
    losses, ces, auxes, ks, grads, counts, margins = [], [], [], [], [], [], []
    for step in range(cfg["steps"]):
        if cfg["router"] == "smoe_dropout":
            k = linear_increase_k(cfg["k_schedule"], step)
        elif cfg["router"] == "topk":
            k = cfg["k"]
        else:
            k = 0
        optimizer.zero_grad()
        routing = []
        step_noise = None if noise is None else noise[step]
        logits, aux = forward(params, ids, cfg, k, routing, step_noise)
        ce = F.cross_entropy(logits, targets)
        loss = ce if aux is None else ce + aux
        loss.backward()
        losses.append(loss.item())
        ces.append(ce.item())
        auxes.append(0.0 if aux is None else aux.item())
        ks.append(k)
        grads.append(
            {
                n: (torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad)
                .detach()
                .clone()
                for n in names
            }
        )
        counts.append([c for c, _ in routing])
        margins.append([m for _, m in routing])
        optimizer.step()

    with h5py.File(os.path.join(directory, "reference.h5"), "w") as f:
        f["losses"] = np.array(losses, dtype=np.float64)
        f["ce"] = np.array(ces, dtype=np.float64)
        f["aux"] = np.array(auxes, dtype=np.float64)
        f["routing/k"] = np.array(ks, dtype=np.int32)
        f["routing/counts"] = np.array(counts, dtype=np.int32)
        f["routing/margin"] = np.array(margins, dtype=np.float64)
        for step, step_grads in enumerate(grads):
            for n in names:
                f[f"grads/step{step}/{n}"] = step_grads[n].numpy()
        for n in names:
            f[f"params_after/{n}"] = params[n].detach().numpy()


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: moe_parity.py CASE_DIR [CASE_DIR ...]")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for directory in sys.argv[1:]:
        run_case(directory)


if __name__ == "__main__":
    main()
