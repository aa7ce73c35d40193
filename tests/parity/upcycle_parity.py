#!/usr/bin/python3
"""PyTorch reference for `cmoe upcycle`, run by tests/cli/test_upcycle.sh.

usage: upcycle_parity.py DENSE.h5 FRESH.h5 UP.h5 [--text FILE --loss equal|differs]

Rebuilds the upcycled model of UP.h5 from the dense checkpoint DENSE.h5 in
PyTorch, independently of cmoe's C code, from the method as METHODS.md 5.2-5.4
and docs/recipes.md ("Upcycling") describe it, with the settings of the recipe
stored in UP.h5 (moe.num_experts N, the expert width H, router.k, router.gating,
moe.every, the upcycle section):
  G = d_ff / H, R = N / G; expert e = shard e mod G: fc1 rows and bias
  entries [s H, (s+1) H), fc2 columns likewise, fc2's bias whole;
  A = G (topk_softmax) or N G / k (softmax_topk); scaling balanced: fc1 weight
  and bias and fc2 weight each x A^(1/2) (GELU: degree 2); output: fc2 weight
  x A; with either, fc2's bias x N / k for softmax_topk;
  router groups: the fresh router's first R rows, row j of the result = fresh
  row floor(j / G); zero: zeros; fresh: the fresh router.
The fresh router is taken from FRESH.h5: the same recipe upcycled with
upcycle.router fresh (cmoe's random init cannot be redrawn here). Every other
tensor must equal DENSE's. Each tensor of UP.h5 must equal the reference
exactly (the same float32 products); the largest difference per tensor is
printed. With --text, python/cmoe_torch.py evaluates DENSE and UP in float64 on
that file: --loss equal asks for the same loss to 1e-9 relative (a
function-preserving configuration), --loss differs for a gap above 1e-4.
Exit status 0 when everything matches.
"""
import argparse
import os
import sys

import h5py
import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import cmoe_torch  # noqa: E402


def read(path):
    with h5py.File(path, "r") as f:
        recipe = f.attrs["recipe"]
        recipe = yaml.safe_load(recipe.decode() if isinstance(recipe, bytes) else recipe)
        params = {name: torch.from_numpy(ds[...]) for name, ds in f["params"].items()}
    return recipe, params


def expert_width(recipe):
    moe, d_ff = recipe["moe"], recipe["model"]["d_ff"]
    if moe["expert_hidden"] > 0:
        return moe["expert_hidden"]
    return d_ff // moe["num_experts"] if moe["split_dense"] else d_ff


def scales(recipe):
    """fc1 scale, fc2 scale, fc2 bias scale (float32, as cmoe stores them)."""
    n, k = recipe["moe"]["num_experts"], recipe["router"]["k"]
    g = recipe["model"]["d_ff"] // expert_width(recipe)
    softmax_first = recipe["router"]["gating"] == "softmax_topk"
    a = n * g / k if softmax_first else g
    mode = recipe["upcycle"]["scaling"]
    fc1 = fc2 = 1.0
    if mode == "balanced":
        fc1 = fc2 = a ** 0.5
    elif mode == "output":
        fc2 = a
    bias = n / k if mode != "none" and softmax_first else 1.0
    return (np.float32(fc1), np.float32(fc2), np.float32(bias))


def expected_block(dense, fresh, recipe, layer):
    """The reference experts and router of MoE block `layer`."""
    n, h = recipe["moe"]["num_experts"], expert_width(recipe)
    g = recipe["model"]["d_ff"] // h
    fc1_w = dense["blocks.%d.mlp.fc1.weight" % layer]  # [F, D]
    fc1_b = dense["blocks.%d.mlp.fc1.bias" % layer]
    fc2_w = dense["blocks.%d.mlp.fc2.weight" % layer]  # [D, F]
    fc2_b = dense["blocks.%d.mlp.fc2.bias" % layer]
    shards = [slice(s * h, (s + 1) * h) for s in range(g)]
    s1, s2, sb = scales(recipe)
    out = {
        "w1": torch.stack([fc1_w[shards[e % g]] for e in range(n)]) * s1,
        "b1": torch.stack([fc1_b[shards[e % g]] for e in range(n)]) * s1,
        "w2": torch.stack([fc2_w[:, shards[e % g]] for e in range(n)]) * s2,
        "b2": torch.stack([fc2_b for _ in range(n)]) * sb,
    }
    prefix = "blocks.%d.moe." % layer
    expected = {prefix + "experts." + key: value for key, value in out.items()}
    for part in ("weight", "bias"):
        name = prefix + "router." + part
        if name not in fresh:
            continue
        rows = fresh[name]
        mode = recipe["upcycle"]["router"]
        if mode == "groups":
            rows = rows[torch.arange(n) // g]
        elif mode == "zero":
            rows = torch.zeros_like(rows)
        expected[name] = rows
    return expected


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dense")
    p.add_argument("fresh")
    p.add_argument("up")
    p.add_argument("--text")
    p.add_argument("--loss", choices=("equal", "differs"))
    args = p.parse_args()
    _, dense = read(args.dense)
    _, fresh = read(args.fresh)
    recipe, up = read(args.up)
    if recipe["upcycle"]["drop_ratio"] != 0:
        sys.exit("upcycle_parity.py compares plain upcycling (drop_ratio 0)")
    expected = {}
    every = recipe["moe"]["every"]
    for layer in range(recipe["model"]["n_layers"]):
        if layer % every == 0:
            expected.update(expected_block(dense, fresh, recipe, layer))
    for name, value in up.items():  # every tensor not built above is the dense one's, or fresh
        if name not in expected:
            expected[name] = dense[name] if name in dense else fresh[name]
    failures = 0
    for name in sorted(up):
        diff = (up[name].double() - expected[name].double()).abs().max().item()
        shape_ok = tuple(up[name].shape) == tuple(expected[name].shape)
        print("%-36s %-14s max |diff| %.3g" % (name, list(up[name].shape), diff))
        failures += diff != 0.0 or not shape_ok
    print("tensors: %d compared, %d differ" % (len(up), failures))
    if args.text:
        torch.set_num_threads(1)
        losses = []
        for path in (args.dense, args.up):
            model = cmoe_torch.load(path)
            losses.append(cmoe_torch.evaluate(model, args.text, model.seq_len, 8, 8))
        gap = abs(losses[1] - losses[0])
        print("torch float64 loss: dense %.12f, upcycled %.12f, gap %.3g" % (losses[0], losses[1], gap))
        if args.loss == "equal" and gap > 1e-9 * losses[0]:
            failures += 1
        if args.loss == "differs" and gap <= 1e-4:
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
