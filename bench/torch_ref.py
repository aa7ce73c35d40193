#!/usr/bin/python3
"""The PyTorch anchor of shared/BENCH.md: idiomatic eager PyTorch versions of
cmoe's reference configurations, timed the way `cmoe bench` times its own.

    /usr/bin/python3 bench/torch_ref.py MODEL [--steps 22] [--skip 2] [--threads 2]

MODEL is lm-dense, lm-moe, cnn-moe or cnn-advmoe (bench/MODEL.yaml is the cmoe
side). Run it with Debian's python3-torch (1.13) as /usr/bin/python3, with
OMP_WAIT_POLICY=PASSIVE for the tuned figure BENCH.md compares against
(bench/run.sh does both). The models are written the way a PyTorch user would
write them (nn.Linear, nn.Conv2d, F.softmax, an optimizer from torch.optim), not
tuned to match cmoe's kernels: that is the point of the anchor.

A step is zero_grad + forward + backward + optimizer step (AdvMoE: both of its
phases, attacks included). The first --skip steps are warm-up; over the rest:
  tok_s = tokens (images for a CNN) per step / step time: median (at the median
          step time), min (slowest step) and max (fastest step);
  achieved_gflops = model FLOPs per step / median step time, where
    LM:  tokens x (6 N_active + 12 n_layer seq_len d_model) (BENCH.md), and
    CNN: 6 x inference multiply-adds per image (one expert group per MoE conv,
         plus the router network) x images, as `cmoe bench` counts them; the
         adversarial attacks of cnn-advmoe are NOT counted (so its figure is
         a lower bound of the arithmetic done);
  peak_rss_mib = getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux) / 1024.
The last line printed is `RESULT {json}`.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- the language models (bench/lm-dense.yaml, bench/lm-moe.yaml) ------------------

LM = dict(vocab=256, d_model=256, n_layer=4, n_head=4, d_ff=1024, seq_len=256, batch=16,
          init_std=0.02, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MOE = dict(num_experts=8, k=2, hidden=1024, aux_coef=0.01)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head, seq_len):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
        self.register_buffer("causal", mask.view(1, 1, seq_len, seq_len), persistent=False)

    def forward(self, x):  # x [B,T,D] -> [B,T,D]
        B, T, D = x.shape
        head = D // self.n_head
        q, k, v = self.qkv(x).split(D, dim=2)
        q = q.view(B, T, self.n_head, head).transpose(1, 2)  # [B,H,T,hd]
        k = k.view(B, T, self.n_head, head).transpose(1, 2)
        v = v.view(B, T, self.n_head, head).transpose(1, 2)
        # torch 1.13 has no F.scaled_dot_product_attention: the explicit form.
        scores = q @ k.transpose(-2, -1) / math.sqrt(head)  # [B,H,T,T]
        scores = scores.masked_fill(~self.causal[:, :, :T, :T], float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # [B,H,T,hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MoE(nn.Module):
    """Softmax-then-top-k routing (gates are the chosen softmax probabilities,
    not renormalised), dropless, the Switch load-balancing loss; dispatch per
    expert: gather its tokens, run its MLP, scale by the gate, index_add back."""

    def __init__(self, d_model, hidden, num_experts, k, aux_coef):
        super().__init__()
        self.k, self.aux_coef = k, aux_coef
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d_model, hidden) for _ in range(num_experts))

    def forward(self, x):  # x [B,T,D] -> ([B,T,D], aux loss)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N,D]
        E = len(self.experts)
        probs = F.softmax(self.router(x), dim=-1)  # [N,E]
        gates, chosen = probs.topk(self.k, dim=-1)  # [N,k] each
        flat_expert = chosen.reshape(-1)  # [N*k] slots
        flat_gate = gates.reshape(-1)
        flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.k)
        counts = torch.bincount(flat_expert, minlength=E)  # [E] slots per expert
        out = torch.zeros_like(x)
        for e, (expert, count) in enumerate(zip(self.experts, counts.tolist())):
            if count == 0:  # early training can leave an expert without tokens
                continue
            slots = (flat_expert == e).nonzero(as_tuple=True)[0]
            tokens = flat_token[slots]
            y = expert(x.index_select(0, tokens)) * flat_gate[slots].unsqueeze(1)
            out.index_add_(0, tokens, y)
        # Switch: E * sum_e f_e P_e, f_e the fraction of the N*k slots routed to
        # e (no gradient), P_e the mean router probability of e.
        fraction = counts.to(probs.dtype) / flat_expert.numel()
        aux = self.aux_coef * E * torch.sum(fraction * probs.mean(dim=0))
        return out.view(shape), aux


class Block(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        d = cfg["d_model"]
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, cfg["n_head"], cfg["seq_len"])
        self.ln2 = nn.LayerNorm(d)
        if moe:
            self.ffn = MoE(d, moe["hidden"], moe["num_experts"], moe["k"], moe["aux_coef"])
        else:
            self.ffn = MLP(d, cfg["d_ff"])

    def forward(self, x):  # pre-LN; -> (x, aux loss or None)
        x = x + self.attn(self.ln1(x))
        h = self.ffn(self.ln2(x))
        if isinstance(h, tuple):
            h, aux = h
            return x + h, aux
        return x + h, None


class TransformerLM(nn.Module):
    """GPT-2 style byte LM: learned positions, pre-LN, untied head, no dropout."""

    def __init__(self, cfg, moe=None):
        super().__init__()
        d, V = cfg["d_model"], cfg["vocab"]
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(cfg["seq_len"], d)
        self.blocks = nn.ModuleList(Block(cfg, moe) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        # cmoe's init: N(0, 0.02) weights, zero biases, the residual
        # projections (attn.proj, fc2) at 0.02 / sqrt(2 n_layer).
        std = cfg["init_std"]
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                residual = name.endswith("proj.weight") or name.endswith("fc2.weight")
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * cfg["n_layer"]) if residual else std)

    def forward(self, ids):  # ids [B,T] -> (logits [B,T,V], aux loss)
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
        aux = torch.zeros(())
        for block in self.blocks:
            x, block_aux = block(x)
            if block_aux is not None:
                aux = aux + block_aux
        return self.head(self.ln_f(x)), aux


def lm_model_flops(cfg, moe):
    """BENCH.md: tokens x (6 N_active + 12 n_layer seq_len d_model), N_active the
    matmul weights one token passes through."""
    d, L, T = cfg["d_model"], cfg["n_layer"], cfg["seq_len"]
    ffn = 2 * d * cfg["d_ff"]
    if moe:
        ffn = moe["k"] * 2 * d * moe["hidden"] + d * moe["num_experts"]
    active = L * (4 * d * d + ffn) + d * cfg["vocab"]
    tokens = cfg["batch"] * T
    return tokens * (6 * active + 12 * L * T * d)


class LMBench:
    def __init__(self, use_moe):
        cfg = LM
        self.moe = MOE if use_moe else None
        self.model = TransformerLM(cfg, self.moe)
        # AdamW with weight decay on the matrices only (cmoe's default policy:
        # not on norms, biases or embeddings).
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            is_matrix = p.dim() >= 2 and not name.startswith(("wte", "wpe"))
            (decay if is_matrix else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"])
        self.batch, self.seq_len = cfg["batch"], cfg["seq_len"]
        self.items_per_step = self.batch * self.seq_len
        self.flops_per_step = lm_model_flops(cfg, self.moe)
        # The KJV training text when data/prepare_kjv.sh has made it (cmoe
        # trains on it too, so expert loads are alike); else random bytes.
        path = os.path.join(REPO, "data", "kjv", "train.txt")
        if os.path.exists(path):
            with open(path, "rb") as f:
                self.text = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        else:
            self.text = None

    def parameter_count(self):
        return sum(p.numel() for p in self.model.parameters())

    def batch_ids(self):  # -> inputs, targets [B,T]
        B, T = self.batch, self.seq_len
        if self.text is None:
            data = torch.randint(0, LM["vocab"], (B, T + 1))
        else:
            starts = torch.randint(0, self.text.numel() - T - 1, (B, 1))
            data = self.text[starts + torch.arange(T + 1)].long()
        return data[:, :-1], data[:, 1:]

    def step(self):
        ids, targets = self.batch_ids()
        self.optimizer.zero_grad(set_to_none=True)
        logits, aux = self.model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux
        loss.backward()
        self.optimizer.step()
        return loss.item()


# ---- the MoE-CNN (bench/cnn-moe.yaml -> recipes/cnn/moe-at.yaml -> dense-*.yaml) ----

CNN = dict(stem=16, widths=(16, 32, 64), ratio=0.5, num_experts=2, router_widths=(8, 16),
           classes=10, batch=128, height=28, width=28, lr=0.05, momentum=0.9,
           weight_decay=5e-4, total_steps=300,
           # cnn-advmoe (bench/cnn-advmoe.yaml, recipe defaults)
           eps=0.1, step_size=0.125, attack_steps=2, beta=6.0, router_weight=6.0)


class StraightThroughOneHot(torch.autograd.Function):
    """The release's GetMask: one-hot of the argmax forward, the mask's
    gradient passed unchanged to the logits backward."""

    @staticmethod
    def forward(ctx, logits):
        return F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class MoEConv(nn.Module):
    """E experts of width w as channel groups of ONE conv with E*w filters, the
    AdvMoE release's way: run the full conv, multiply by the routing mask, then
    gather each image's chosen group (w channels)."""

    def __init__(self, in_channels, width, num_experts, stride):
        super().__init__()
        self.width, self.num_experts = width, num_experts
        self.conv = nn.Conv2d(in_channels, num_experts * width, 3, stride, 1, bias=False)

    def forward(self, x, mask, expert):  # x [N,C,H,W], mask [N,E], expert [N] -> [N,w,HO,WO]
        out = self.conv(x)
        N, _, H, W = out.shape
        out = out.view(N, self.num_experts, self.width, H, W) * mask.view(N, -1, 1, 1, 1)
        index = expert.view(N, 1, 1, 1, 1).expand(N, 1, self.width, H, W)
        return out.gather(1, index).squeeze(1)


def conv_bn(in_channels, out_channels, kernel, stride, relu):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class Router(nn.Module):
    """cmoe's image-level router: conv3x3-BN-ReLU units (stride 1, then 2) ->
    global average pool -> linear to E logits."""

    def __init__(self, in_channels, widths, num_experts):
        super().__init__()
        units, channels = [], in_channels
        for i, width in enumerate(widths):
            units.append(conv_bn(channels, width, 3, 1 if i == 0 else 2, relu=True))
            channels = width
        self.convs = nn.Sequential(*units)
        self.fc = nn.Linear(channels, num_experts)

    def forward(self, x):
        return self.fc(self.convs(x).mean(dim=(2, 3)))


class MoEBasicBlock(nn.Module):
    def __init__(self, in_channels, width, num_experts, stride):
        super().__init__()
        self.conv1 = MoEConv(in_channels, width, num_experts, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = MoEConv(width, width, num_experts, 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = None
        if stride != 1 or in_channels != width:
            self.shortcut = conv_bn(in_channels, width, 1, stride, relu=False)

    def forward(self, x, mask, expert):
        h = F.relu(self.bn1(self.conv1(x, mask, expert)))
        h = self.bn2(self.conv2(h, mask, expert))
        return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


class MoECNN(nn.Module):
    """The MoE-CNN of cmoe's layers/moe_conv.h: a dense stem (not scaled by the
    ratio), one MoE BasicBlock per stage of width int(ratio * width) (the first
    block of stages > 0 with stride 2), projection shortcuts, global average
    pool, linear classifier; ONE router on the image whose choice every MoE
    conv uses (the release's whole-pathway routing)."""

    def __init__(self, cfg):
        super().__init__()
        E = cfg["num_experts"]
        self.router = Router(1, cfg["router_widths"], E)
        self.stem = conv_bn(1, cfg["stem"], 3, 1, relu=True)
        blocks, channels = [], cfg["stem"]
        for s, stage_width in enumerate(cfg["widths"]):
            width = int(cfg["ratio"] * stage_width)
            blocks.append(MoEBasicBlock(channels, width, E, 2 if s > 0 else 1))
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(channels, cfg["classes"])
        # The release's initialize_weights: Kaiming normal (fan_out, ReLU) convs,
        # N(0, 0.01) linears with zero bias, BN 1 / 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # x [N,1,H,W] -> (logits [N,classes], router logits [N,E])
        router_logits = self.router(x)
        mask = StraightThroughOneHot.apply(router_logits)
        expert = router_logits.argmax(dim=1)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, mask, expert)
        return self.fc(h.mean(dim=(2, 3))), router_logits


def inference_macs_per_image(model, cfg):
    """Multiply-adds of one image's inference through the convs and linear
    layers, one expert group per MoE conv (cmoe's moe_cnn_flops total: what
    `cmoe train` prints as "inference: ... multiply-adds per image"),
    counted on the model itself with forward hooks."""
    moe_convs = {id(m.conv): m.num_experts for m in model.modules() if isinstance(m, MoEConv)}
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_filter = module.in_channels // module.groups * module.kernel_size[0] * \
                module.kernel_size[1]
            total[0] += output[0].numel() * per_filter // moe_convs.get(id(module), 1)
        else:
            total[0] += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, cfg["height"], cfg["width"]))
    model.train()
    for hook in hooks:
        hook.remove()
    return total[0]


def kl_batchmean(logits_clean, logits_adv):
    """KL(softmax(clean) || softmax(adv)) averaged over the batch (PyTorch's
    KLDivLoss(log_softmax(adv), softmax(clean), batchmean)), written out so
    the gradient reaches both arguments as in TRADES."""
    logp_clean = F.log_softmax(logits_clean, dim=1)
    return torch.sum(logp_clean.exp() * (logp_clean - F.log_softmax(logits_adv, dim=1))) / \
        logits_clean.shape[0]


class CNNBench:
    def __init__(self, advmoe):
        cfg = CNN
        self.cfg, self.advmoe = cfg, advmoe
        self.model = MoECNN(cfg)
        self.items_per_step = cfg["batch"]
        self.macs_per_image = inference_macs_per_image(self.model, cfg)
        # Attacks are not counted (module docstring).
        self.flops_per_step = 6 * self.macs_per_image * cfg["batch"]
        router = set(id(p) for p in self.model.router.parameters())
        theta = [p for p in self.model.parameters() if id(p) not in router]
        phi = list(self.model.router.parameters())
        # AdvMoE: the release's two optimizers (theta; phi); the standard step
        # updates all parameters with one. SGD with weight decay on the conv
        # and linear weights only (cmoe's default policy: not on norms or
        # biases), cosine over the recipe's 300 steps.
        groups = [theta, phi] if advmoe else [theta + phi]
        self.optimizers = [torch.optim.SGD(self.decay_groups(g), lr=cfg["lr"],
                                           momentum=cfg["momentum"]) for g in groups]
        self.schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, cfg["total_steps"])
                          for o in self.optimizers]

    def decay_groups(self, params):
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": self.cfg["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0}]

    def parameter_count(self):
        """Parameters plus the BN running statistics, as `cmoe inspect` counts."""
        stats = sum(b.numel() for n, b in self.model.named_buffers()
                    if n.endswith(("running_mean", "running_var")))
        return sum(p.numel() for p in self.model.parameters()) + stats

    def attack(self, x):
        """The AdvMoE release's TRADES training attack, in eval mode (BN running
        statistics): start x + 0.001 N(0,1); steps of sign(grad) of
        KL(f(x) || f(x')) + KL(r(x) || r(x')), clipped to the eps ball and [0,1]."""
        cfg = self.cfg
        self.model.eval()
        with torch.no_grad():
            logits, router_logits = self.model(x)
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(cfg["attack_steps"]):
            x_adv.requires_grad_(True)
            adv_logits, adv_router_logits = self.model(x_adv)
            loss = kl_batchmean(logits, adv_logits) + kl_batchmean(router_logits,
                                                                   adv_router_logits)
            grad, = torch.autograd.grad(loss, [x_adv])  # the input's gradient only
            x_adv = x_adv.detach() + cfg["step_size"] * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - cfg["eps"]), x + cfg["eps"]).clamp(0.0, 1.0)
        self.model.train()
        return x_adv.detach()

    def step(self):
        cfg = self.cfg
        # Random images in [0,1] and random labels (the data does not change the cost).
        x = torch.rand(cfg["batch"], 1, cfg["height"], cfg["width"])
        y = torch.randint(0, cfg["classes"], (cfg["batch"],))
        if not self.advmoe:  # one standard step: CE on clean images, all parameters
            optimizer = self.optimizers[0]
            optimizer.zero_grad(set_to_none=True)
            logits, _ = self.model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            self.schedules[0].step()
            return loss.item()
        theta_optimizer, phi_optimizer = self.optimizers
        # Expert step: the TRADES loss on a fresh attack, theta updated (the
        # router gets straight-through gradients too, which its step discards).
        x_adv = self.attack(x)
        theta_optimizer.zero_grad(set_to_none=True)
        logits, _ = self.model(x)
        adv_logits, _ = self.model(x_adv)
        loss = F.cross_entropy(logits, y) + cfg["beta"] * kl_batchmean(logits, adv_logits)
        loss.backward()
        theta_optimizer.step()
        # Router step on the updated theta: a fresh attack, then the release's
        # router objective alpha CE(r(x), y mod E) + beta KL(r(x) || r(x')),
        # phi updated. Whole-model forwards, as task_cnn.c (their BN
        # running statistics updates belong to the step).
        x_adv = self.attack(x)
        phi_optimizer.zero_grad(set_to_none=True)
        _, router_logits = self.model(x)
        _, adv_router_logits = self.model(x_adv)
        route_labels = y % cfg["num_experts"]
        router_loss = cfg["router_weight"] * F.cross_entropy(router_logits, route_labels) + \
            cfg["beta"] * kl_batchmean(router_logits, adv_router_logits)
        router_loss.backward()
        phi_optimizer.step()
        for schedule in self.schedules:
            schedule.step()
        return loss.item()


# ---- timing ----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["lm-dense", "lm-moe", "cnn-moe", "cnn-advmoe"])
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if not 0 <= args.skip < args.steps:
        parser.error("--skip must be in [0, --steps)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.model.startswith("lm-"):
        bench = LMBench(use_moe=args.model == "lm-moe")
        unit = "tokens"
    else:
        bench = CNNBench(advmoe=args.model == "cnn-advmoe")
        unit = "images"
        print(f"inference: {bench.macs_per_image / 1e6:.2f} M multiply-adds per image "
              f"({bench.macs_per_image})", file=sys.stderr)
    print(f"{args.model}: {bench.parameter_count()} parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    seconds = []
    for step in range(args.steps):
        start = time.perf_counter()
        loss = bench.step()
        seconds.append(time.perf_counter() - start)
        print(f"\rstep {step + 1}/{args.steps}  {1e3 * seconds[-1]:.1f} ms  loss {loss:.4f}",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    timed = seconds[args.skip:]
    step_median = statistics.median(timed)
    items = bench.items_per_step
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"{args.model}: {len(timed)} timed steps after {args.skip} warm-up: "
          f"{items / step_median:.0f} {unit}/s median, step {1e3 * step_median:.1f} ms, "
          f"{bench.flops_per_step / 1e9:.2f} model GFLOP per step, peak RSS {rss_mib:.0f} MiB")
    result = {
        "model": args.model,
        "tok_s_median": round(items / step_median, 1),
        "tok_s_min": round(items / max(timed), 1),
        "tok_s_max": round(items / min(timed), 1),
        "achieved_gflops": round(bench.flops_per_step / step_median / 1e9, 2),
        "peak_rss_mib": round(rss_mib, 1),
        "step_ms_median": round(1e3 * step_median, 2),
        "threads": args.threads,
        "steps": len(timed),
        "model_gflop_per_step": round(bench.flops_per_step / 1e9, 3),
        "parameters": bench.parameter_count(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
