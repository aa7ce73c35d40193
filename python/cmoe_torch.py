#!/usr/bin/python3
"""cmoe's byte-level LM in PyTorch, built from a cmoe HDF5 checkpoint.

    import cmoe_torch
    model = cmoe_torch.load("runs/moe-top2/ckpt-00002000.h5")   # eval mode
    logits = model(ids)                                         # ids [B,T] -> [B,T,256]
    loss = cmoe_torch.evaluate(model, "data/kjv/test.txt", model.seq_len, 16)

or from the shell, printing what `cmoe eval` prints:

    /usr/bin/python3 python/cmoe_torch.py CKPT [CKPT...] --text data/kjv/test.txt

The model (dense, or MoE with any router cmoe has: topk, smoe_dropout,
top_p, thor, expert_choice, null_experts, bias_balance, rmoe) and its settings come from the recipe stored in
the checkpoint; the parameter names of `model.state_dict()` are exactly the
checkpoint's /params names. docs/model.md describes every computation; this
file is meant to be read next to it. Inference only: no dropout, no router
noise, no auxiliary losses.

Two MoE behaviours make a forward pass depend on more than the tokens it
scores, exactly as in cmoe:
  - expert choice (and a capacity limit, router.capacity_factor > 0) select
    among all the tokens of one call, i.e. of the whole batch `ids`;
  - THOR draws its random experts from (train.seed, block index, the global
    sequence or token index): pass `first_row`, the index of row 0 of `ids`
    among the evaluation windows (evaluate() does).

Needs the Debian python3-torch, python3-h5py, python3-numpy, python3-yaml.
"""
import argparse
import math
import sys

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

VOCAB = 256
LN2 = math.log(2.0)
MASK64 = (1 << 64) - 1

# ---- Philox-4x32-10 and cmoe's key layout (src/common/rng.c) ---------------

RNG_ROUTER = 4  # cm_rng_purpose: INIT 1, DROPOUT 2, DATA 3, ROUTER 4, ...
THOR_SEQUENCE_INDEX_BASE = 1 << 62  # src/routers/thor.c
THOR_TOKEN_INDEX_BASE = 1 << 63


def _mix64(x):
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def philox4x32_10(counter, key):
    """counter: 4 uint64 arrays holding 32-bit words; key: two ints -> 4 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = key
    low = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            p1 & low,
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            p0 & low,
        )
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def rng_below(seed, step, layer, purpose, index, n):
    """cm_rng_below: uniform integers in [0, n) for each 64-bit index (array)."""
    k = _mix64(seed ^ _mix64((((layer << 32) | purpose) + 1) & MASK64))
    index = np.asarray(index, dtype=np.uint64)
    low, shift = np.uint64(0xFFFFFFFF), np.uint64(32)
    counter = (index & low, index >> shift, np.uint64(step & 0xFFFFFFFF), np.uint64(step >> 32))
    b0, b1, _, _ = philox4x32_10(counter, (k & 0xFFFFFFFF, k >> 32))
    # (b0 2^32 + b1) n >> 64, without 128-bit integers (n < 2^32)
    n = np.uint64(n)
    return ((b0 * n + ((b1 * n) >> shift)) >> shift).astype(np.int64)


# ---- the model --------------------------------------------------------------


def ceil_count(value):
    """router_ceil_count: ceil, but an excess below 1e-6 relative is rounding."""
    below = math.floor(value)
    return int(below) if value - below <= 1e-6 * abs(value) else int(math.ceil(value))


def as_float32(x):
    """A recipe float as cmoe's router_config holds it (float, then double)."""
    return float(np.float32(x))


def stable_desc(scores, dim):
    """Indices sorting `scores` descending along dim; ties keep the lower index."""
    return torch.sort(scores, dim=dim, descending=True, stable=True).indices


class Attention(nn.Module):
    """Causal multi-head self-attention over a fused qkv projection."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)  # rows: q, then k, then v
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        batch, seq, d = x.shape
        dh = d // self.n_head
        q, k, v = self.qkv(x).split(d, dim=-1)  # head h: columns h*dh .. (h+1)*dh-1
        heads = lambda t: t.view(batch, seq, self.n_head, dh).transpose(1, 2)
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dh)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(batch, seq, d)
        return self.proj(out)


class MLP(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Experts(nn.Module):
    """E expert MLPs: w1 [E,H,D], b1 [E,H], w2 [E,D,H], b2 [E,D] (+ SwiGLU's w3, b3)."""

    def __init__(self, experts, d_model, hidden, activation):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.zeros(experts, hidden, d_model))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.zeros(experts, d_model, hidden))
        self.b2 = nn.Parameter(torch.zeros(experts, d_model))
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.zeros(experts, hidden, d_model))
            self.b3 = nn.Parameter(torch.zeros(experts, hidden))

    def forward(self, e, x):
        """Expert e on rows x [n,D] -> [n,D], its output bias included."""
        h = x @ self.w1[e].T + self.b1[e]
        if self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "silu":
            h = F.silu(h)
        elif self.activation == "swiglu":
            h = F.silu(h) * (x @ self.w3[e].T + self.b3[e])
        else:
            raise ValueError("unknown moe.activation %r" % self.activation)
        return h @ self.w2[e].T + self.b2[e]


class MoE(nn.Module):
    """Router + experts. route() returns the kept (token, expert, gate) slots."""

    def __init__(self, layer, d_model, moe_cfg, router_cfg, hidden, seed):
        super().__init__()
        self.layer, self.seed = layer, seed
        self.cfg = router_cfg
        self.kind = router_cfg["type"]
        self.experts_count = moe_cfg["num_experts"]
        self.null_count = router_cfg.get("null_experts", 0) if self.kind == "null_experts" else 0
        if self.kind == "rmoe":  # logits read on the GRU state; a projection feeds the GRU
            hidden_r = router_cfg["rnn_hidden"]
            self.router = nn.Linear(hidden_r, self.experts_count, bias=False)
            self.router.proj_weight = nn.Parameter(torch.zeros(hidden_r, d_model))
        elif self.kind != "thor":
            self.router = nn.Linear(d_model, self.experts_count, bias=bool(router_cfg["bias"]))
            if router_cfg["noise"] == "learned":  # stored, unused at inference
                self.router.noise_weight = nn.Parameter(torch.zeros(self.experts_count, d_model))
        if self.null_count > 0:  # null experts' logits: a second linear layer
            self.router.null_weight = nn.Parameter(torch.zeros(self.null_count, d_model))
            if router_cfg["bias"]:
                self.router.null_bias = nn.Parameter(torch.zeros(self.null_count))
        if self.kind == "bias_balance":  # selection bias: chooses, never weighs
            self.router.expert_bias = nn.Parameter(torch.zeros(self.experts_count),
                                                   requires_grad=False)
        self.experts = Experts(self.experts_count, d_model, hidden, moe_cfg["activation"])
        self.k_override = 0

    def eval_k(self):
        if self.k_override > 0:
            return self.k_override
        return self.cfg["eval_k"] if self.cfg["eval_k"] > 0 else self.cfg["k"]

    def rmoe_logits(self, x, depth):
        """RMoE (docs/model.md): x' = W1 x, h = GRU(x', previous state), logits = W2 h.
        depth: {"gru": the shared nn.GRUCell, "h": the previous MoE layer's state or None}."""
        previous = depth["h"]
        if previous is None or self.cfg["rnn_state"] == "zero":
            previous = x.new_zeros(x.shape[0], self.router.proj_weight.shape[0])
        elif self.cfg["rnn_state"] == "detach":
            previous = previous.detach()
        state = depth["gru"](x @ self.router.proj_weight.T, previous)
        depth["h"] = state
        return self.router(state)

    def route(self, x, seq_len, first_token, depth=None):
        """x [N,D] -> token [S], expert [S], gate [S] (token-major)."""
        n, experts = x.shape[0], self.experts_count
        if self.kind == "thor":
            return self.route_thor(x, seq_len, first_token)
        logits = self.rmoe_logits(x, depth) if self.kind == "rmoe" else self.router(x)  # [N,E]
        probs = logits.softmax(-1)
        if self.kind == "expert_choice":
            per_expert = ceil_count(n * as_float32(self.cfg["capacity_factor"]) / experts)
            order = stable_desc(probs, dim=0)[: min(per_expert, n)]  # [c,E]: tokens per expert
            chosen = torch.zeros(n, experts, dtype=torch.bool, device=x.device)
            chosen[order, torch.arange(experts).expand_as(order)] = True
            token, expert = chosen.nonzero(as_tuple=True)
            return token, expert, probs[token, expert]  # no capacity drop
        if self.kind == "top_p":
            order = stable_desc(probs, dim=1)
            sorted_probs = probs.gather(1, order).double()
            # the mass of the higher-ranked experts, summed in order as cmoe does
            before = F.pad(sorted_probs.cumsum(1)[:, :-1], (1, 0))
            # keep while the mass so far has not exceeded p: the smallest prefix > p
            keep_sorted = before <= as_float32(self.cfg["top_p"])
            keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
            token, expert = keep.nonzero(as_tuple=True)
            gates = probs[token, expert]
            return self.capacity(token, expert, gates, gates, load=len(token))
        if self.null_count > 0:  # null experts: columns E .. E+m of the logits
            null_bias = getattr(self.router, "null_bias", None)
            null_logits = x @ self.router.null_weight.T
            if null_bias is not None:
                null_logits = null_logits + null_bias
            logits = torch.cat([logits, null_logits], dim=1)
            probs = logits.softmax(-1)
        # topk, null_experts, bias_balance and rmoe (gating from the recipe) and
        # smoe_dropout (always topk_softmax)
        k = self.eval_k()
        if self.kind == "bias_balance":
            # top-k of p + b; ties: the larger logit, then the lower index
            by_logit = stable_desc(logits, dim=1)
            biased = (probs + self.router.expert_bias).gather(1, by_logit)
            order = by_logit.gather(1, stable_desc(biased, dim=1))
        else:
            order = stable_desc(logits, dim=1)
        chosen = order[:, :k].sort(dim=1).values  # ascending expert
        real = chosen < experts  # null experts are no slots
        token = torch.arange(n, device=x.device).repeat_interleave(k)[real.reshape(-1)]
        expert = chosen[real]
        gating = "topk_softmax" if self.kind == "smoe_dropout" else self.cfg["gating"]
        if gating == "softmax_topk":
            gates = probs.gather(1, chosen)[real]
        else:  # a softmax over the chosen true experts' logits
            chosen_logits = logits.gather(1, chosen).masked_fill(~real, float("-inf"))
            gates = chosen_logits.softmax(-1)[real]  # a row of nulls only has no slot
        load = k * n * experts / (experts + self.null_count)
        return self.capacity(token, expert, gates, gates, load=load)

    def route_thor(self, x, seq_len, first_token):
        n = x.shape[0]
        global_token = np.uint64(first_token) + np.arange(n, dtype=np.uint64)
        if self.cfg["thor_level"] == "per_sequence":
            index = np.uint64(THOR_SEQUENCE_INDEX_BASE) + global_token // np.uint64(seq_len)
        else:
            index = np.uint64(THOR_TOKEN_INDEX_BASE) + global_token
        # eval: step 0; key (train.seed, 0, block index, CM_RNG_ROUTER)
        drawn = rng_below(self.seed, 0, self.layer, RNG_ROUTER, index, self.experts_count)
        token = torch.arange(n, device=x.device)
        expert = torch.as_tensor(drawn, device=x.device)
        ones = torch.ones(n, dtype=x.dtype, device=x.device)
        return self.capacity(token, expert, ones, ones, load=n)

    def capacity(self, token, expert, gates, priority, load):
        """router_finish: with capacity_factor > 0, an expert keeps at most
        ceil(load / E * cf) slots (highest priority, or first tokens); the
        kept gates are not renormalised."""
        cf = as_float32(self.cfg["capacity_factor"])
        if cf <= 0 or len(token) == 0:
            return token, expert, gates
        cap = ceil_count(load / self.experts_count * cf)
        keep = torch.ones(len(token), dtype=torch.bool, device=token.device)
        for e in range(self.experts_count):
            members = (expert == e).nonzero().flatten()  # in token order
            if len(members) <= cap:
                continue
            if self.cfg["drop_policy"] == "probability":
                members = members[stable_desc(priority[members].float(), dim=0)]
            keep[members[cap:]] = False
        return token[keep], expert[keep], gates[keep]

    def forward(self, h, seq_len, first_token, depth=None):
        """h [B,T,D] -> [B,T,D]: out[t] = sum over t's slots of gate * expert(h[t])."""
        x = h.reshape(-1, h.shape[-1])
        token, expert, gates = self.route(x, seq_len, first_token, depth)
        out = torch.zeros_like(x)
        for e in range(self.experts_count):
            slots = (expert == e).nonzero().flatten()
            if len(slots):
                rows = token[slots]
                out.index_add_(0, rows, gates[slots, None].to(x.dtype) * self.experts(e, x[rows]))
        return out.view_as(h)


class Block(nn.Module):
    def __init__(self, layer, model_cfg, moe_cfg, router_cfg, seed):
        super().__init__()
        d, eps = model_cfg["d_model"], float(model_cfg["layernorm_eps"])
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, model_cfg["n_heads"])
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.is_moe = bool(moe_cfg.get("enabled")) and layer % moe_cfg["every"] == 0
        if self.is_moe:
            hidden = moe_cfg["expert_hidden"]
            if hidden <= 0:
                hidden = model_cfg["d_ff"]
                if moe_cfg["split_dense"]:
                    hidden //= moe_cfg["num_experts"]
            self.moe = MoE(layer, d, moe_cfg, router_cfg, hidden, seed)
        else:
            self.mlp = MLP(d, model_cfg["d_ff"])

    def forward(self, x, first_token, depth=None):
        """depth: RMoE's state carried across the MoE layers (dense layers pass it on)."""
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        h = self.moe(h, x.shape[1], first_token, depth) if self.is_moe else self.mlp(h)
        return x + h


class CmoeLM(nn.Module):
    """The byte-level transformer LM of src/layers/transformer.c (eval mode)."""

    def __init__(self, recipe):
        super().__init__()
        self.recipe = recipe
        m = recipe["model"]
        if m.get("arch", "transformer_lm") != "transformer_lm":
            raise ValueError("not a language model checkpoint (model.arch %s)" % m.get("arch"))
        self.seq_len = recipe["data"]["seq_len"]  # the context length wpe holds
        seed = int(recipe["train"]["seed"])
        d, vocab = m["d_model"], m.get("vocab_size", VOCAB)
        self.wte = nn.Parameter(torch.zeros(vocab, d))
        self.wpe = nn.Parameter(torch.zeros(self.seq_len, d))
        moe_cfg, router_cfg = recipe.get("moe", {}), recipe.get("router", {})
        self.blocks = nn.ModuleList(
            Block(layer, m, moe_cfg, router_cfg, seed) for layer in range(m["n_layers"])
        )
        self.ln_f = nn.LayerNorm(d, eps=float(m["layernorm_eps"]))
        self.head = nn.Linear(d, vocab, bias=False)  # not tied to wte
        self.router_gru = None
        if moe_cfg.get("enabled") and router_cfg.get("type") == "rmoe":
            # RMoE's GRU, shared by every MoE layer: router_gru.{weight,bias}_{ih,hh},
            # gates r, z, n (cmoe's ag_gru_cell is PyTorch's GRUCell)
            self.router_gru = nn.GRUCell(router_cfg["rnn_hidden"], router_cfg["rnn_hidden"])

    def set_k(self, k):
        """Experts per token for topk / smoe_dropout (cmoe eval --set router.eval_k=K); 0: recipe."""
        for block in self.blocks:
            if block.is_moe:
                block.moe.k_override = k

    def forward(self, ids, first_row=0):
        """ids [B,T] byte values (T <= seq_len) -> logits [B,T,256].
        first_row: global index of row 0 among the evaluation windows (THOR)."""
        seq = ids.shape[1]
        if seq > self.seq_len:
            raise ValueError("sequence length %d exceeds the model's %d" % (seq, self.seq_len))
        x = self.wte[ids] + self.wpe[:seq]
        depth = {"gru": self.router_gru, "h": None}  # RMoE: h_0 = 0 at the first MoE layer
        for block in self.blocks:
            x = block(x, first_row * seq, depth)
        return self.head(self.ln_f(x))


def load(path, dtype=torch.float64, device="cpu"):
    """A cmoe checkpoint -> CmoeLM in eval mode (float64 by default)."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") not in (b"cmoe-ckpt", "cmoe-ckpt"):
            raise ValueError("%s is not a cmoe checkpoint" % path)
        recipe_text = f.attrs["recipe"]
        if isinstance(recipe_text, bytes):
            recipe_text = recipe_text.decode()
        params = {name: torch.from_numpy(ds[...]) for name, ds in f["params"].items()}
    model = CmoeLM(yaml.safe_load(recipe_text))
    model.load_state_dict(params, strict=True)  # the names are the checkpoint's
    return model.to(dtype=dtype, device=device).eval()


def eval_windows(data, seq_len, batch_size, max_batches=0):
    """The batches `cmoe eval` scores (text_eval_begin / text_eval_next):
    windows of seq_len + 1 bytes starting at w * seq_len, w = 0, 1, ... while
    a whole window fits (the tail is dropped), batch_size per batch (the last
    may be short); max_batches > 0 keeps only the first max_batches batches.
    Yields (first window index, array [rows, seq_len + 1])."""
    windows = (len(data) - 1) // seq_len
    if windows < 1:
        raise ValueError("text of %d bytes is shorter than seq_len + 1 = %d" % (len(data), seq_len + 1))
    if 0 < max_batches <= windows // batch_size:
        windows = max_batches * batch_size
    starts = np.arange(windows) * seq_len
    for first in range(0, windows, batch_size):
        rows = starts[first : first + batch_size]
        yield first, np.stack([data[s : s + seq_len + 1] for s in rows])


@torch.no_grad()
def evaluate(model, text_path, seq_len, batch_size, max_batches=0):
    """Mean cross-entropy (nats per byte) over the windows `cmoe eval` scores."""
    data = np.fromfile(text_path, dtype=np.uint8)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first, batch in eval_windows(data, seq_len, batch_size, max_batches):
        batch = torch.from_numpy(batch.astype(np.int64)).to(device)
        logits = model(batch[:, :-1], first_row=first)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate cmoe LM checkpoints in PyTorch on the windows `cmoe eval` scores.")
    p.add_argument("ckpt", nargs="+", help="one or more checkpoints (several: one line each)")
    p.add_argument("--text", required=True, help="byte-level text file (e.g. data/kjv/test.txt)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the recipe's data.batch_size")
    p.add_argument("--max-batches", type=int, default=0, help="0: every batch")
    p.add_argument("--k", type=int, default=0, help="experts per token (topk, smoe_dropout); 0: recipe")
    p.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data_size = np.fromfile(args.text, dtype=np.uint8).size
    for path in args.ckpt:
        model = load(path, dtype=torch.float32 if args.float32 else torch.float64)
        model.set_k(args.k)
        batch = args.batch_size or model.recipe["data"]["batch_size"]
        loss = evaluate(model, args.text, model.seq_len, batch, args.max_batches)
        windows = (data_size - 1) // model.seq_len
        if 0 < args.max_batches <= windows // batch:
            windows = args.max_batches * batch
        prefix = path + ": " if len(args.ckpt) > 1 else ""
        print("%sloss %.6f nats/byte, bpc %.6f over %d bytes"
              % (prefix, loss, loss / LN2, windows * model.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
