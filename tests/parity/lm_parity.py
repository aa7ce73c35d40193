#!/usr/bin/python3
"""PyTorch reference for the dense byte LM, used by tests/test_parity.c.

Reads a cmoe checkpoint (parameters by name, written by the C test), a batch
of token ids, and the model/optimizer settings; rebuilds the same model in
PyTorch; writes the loss and every parameter gradient of the first step, and
the parameters after `steps` AdamW steps, to an HDF5 file the C test
compares against.

usage: lm_parity.py CKPT BATCH.bin OUT.h5 --batch B --seq T --layers L
                    --heads H --lr LR --beta1 B1 --beta2 B2 --eps EPS
                    --weight-decay WD --steps N
"""
import argparse
import math

import h5py
import numpy as np
import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("batch")
    p.add_argument("out")
    for name in ("batch-size", "seq", "layers", "heads", "steps"):
        p.add_argument("--" + name, type=int, required=True)
    for name in ("lr", "beta1", "beta2", "eps", "weight-decay"):
        p.add_argument("--" + name, type=float, required=True)
    return p.parse_args()


def forward(params, ids, n_layer, n_head):
    """ids [B,T] -> logits [B*T,V]; mirrors src/layers/transformer.c."""
    batch, seq = ids.shape
    x = params["wte"][ids] + params["wpe"][:seq]
    d = x.shape[-1]
    dh = d // n_head
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    for layer in range(n_layer):
        p = lambda name: params[f"blocks.{layer}.{name}"]
        h = F.layer_norm(x, (d,), p("ln1.weight"), p("ln1.bias"), 1e-5)
        qkv = h @ p("attn.qkv.weight").T + p("attn.qkv.bias")
        q, k, v = qkv.split(d, dim=-1)
        heads = lambda t: t.view(batch, seq, n_head, dh).transpose(1, 2)
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~mask, float("-inf"))
        attended = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(batch, seq, d)
        x = x + attended @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, (d,), p("ln2.weight"), p("ln2.bias"), 1e-5)
        h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"), approximate="tanh")
        x = x + h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    x = F.layer_norm(x, (d,), params["ln_f.weight"], params["ln_f.bias"], 1e-5)
    return (x @ params["head.weight"].T).reshape(batch * seq, -1)


def main():
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    params, decay = {}, {}
    with h5py.File(args.ckpt, "r") as f:
        for name, dataset in f["params"].items():
            params[name] = torch.tensor(np.asarray(dataset, dtype=np.float64), requires_grad=True)
            decay[name] = not bool(dataset.attrs.get("no_decay", 0))
    raw = np.fromfile(args.batch, dtype=np.int32).reshape(args.batch_size, args.seq + 1)
    ids = torch.tensor(raw[:, :-1], dtype=torch.long)
    targets = torch.tensor(raw[:, 1:], dtype=torch.long).reshape(-1)

    names = sorted(params)
    groups = [
        {"params": [params[n] for n in names if decay[n]], "weight_decay": args.weight_decay},
        {"params": [params[n] for n in names if not decay[n]], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps)
    losses, first_grads = [], None
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(params, ids, args.layers, args.heads), targets)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            first_grads = {n: params[n].grad.detach().clone() for n in names}
        optimizer.step()

    with h5py.File(args.out, "w") as f:
        f["losses"] = np.array(losses, dtype=np.float64)
        for n in names:
            f[f"grads/{n}"] = first_grads[n].numpy()
            f[f"params_after/{n}"] = params[n].detach().numpy()


if __name__ == "__main__":
    main()
