#!/usr/bin/env python3
"""PyTorch twin of `tandem bench train`, run by hand (never by CI) to compare training speed.

It builds the same model, loss and optimiser as the Rust bench on the same synthetic shape:

- user tower: [mean of the last L history item embeddings | last item embedding | 4 time-context
  values] -> Linear(132, 256) -> ReLU -> Linear(256, 64) -> L2-normalise (user ids and features
  are off by default in tandem, so the user-id table exists but is not read, as in the Rust model);
- item tower: item-id embedding -> Linear(64, 256) -> ReLU -> Linear(256, 64) -> L2-normalise;
- dropout 0.3 on both towers' inputs, id dropout 0.05 (user id and positive item id -> row 0);
- loss: softmax over the batch's positives plus 1024 shared uniform negatives, logits
  <u, c> / 0.05 - log Q (log(B p(item)) from streaming exact counts for in-batch candidates,
  log(1024 / N) for uniform ones), accidental hits and every item the user saw before the
  example masked out of the row's negatives;
- optimiser: AdamW (lr 2e-3, weight decay 1e-5) on the dense layers and a lazy AdamW on the
  touched rows of the embedding tables (the rows of one step are gathered into a leaf tensor,
  differentiated, and only those rows of the table and of its moments are updated).

Usage: python3 bench/torch_ref.py [--threads 1] [--steps 20] [--batch-size 1024]
       [--items 100000] [--users 20000] [--device cpu|cuda] [--compile]
Prints one JSON line shaped like `tandem bench train --threads N`.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

DIM = 64
HIDDEN = 256
HISTORY = 50
UNIFORM = 1024
TAU = 0.05
LR = 2e-3
WD = 1e-5
DROPOUT = 0.3
ID_DROPOUT = 0.05
FEATURE_DIM = 16
MASKED = -1e9


class LazyTable:
    """An embedding table with per-row Adam moments, updated only on the rows a step touches."""

    def __init__(self, rows, dim, dev, gen):
        self.data = torch.randn(rows, dim, device=dev, generator=gen) * 0.1
        self.m = torch.zeros_like(self.data)
        self.v = torch.zeros_like(self.data)

    def gather(self, ids):
        rows, local = torch.unique(ids, return_inverse=True)
        leaf = self.data[rows].clone().requires_grad_(True)
        return rows, local, leaf

    def apply(self, rows, grad, step):
        b1, b2, eps = 0.9, 0.999, 1e-8
        m = self.m[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.v[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.m[rows] = m
        self.v[rows] = v
        mh = m / (1 - b1**step)
        vh = v / (1 - b2**step)
        w = self.data[rows] * (1 - LR * WD) - LR * mh / (vh.sqrt() + eps)
        self.data[rows] = w


def mlp(inp, dev):
    layers = torch.nn.Sequential(
        torch.nn.Linear(inp, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, DIM)
    )
    return layers.to(dev)


def context(ts):
    hour = (ts % 86400) / 3600.0
    dow = ((ts // 86400) + 3) % 7
    tau = 2 * math.pi
    return np.stack(
        [
            np.sin(tau * hour / 24),
            np.cos(tau * hour / 24),
            np.sin(tau * dow / 7),
            np.cos(tau * dow / 7),
        ],
        axis=-1,
    ).astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the two MLPs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    gen = torch.Generator(device=dev).manual_seed(1)
    torch.manual_seed(1)
    rng = np.random.default_rng(0)
    b, n_items, n_users = a.batch_size, a.items, a.users
    seq_len = HISTORY + 10
    seqs = rng.integers(1, n_items + 1, size=(n_users, seq_len))
    # Vocabulary row 0 is the out-of-vocabulary / padding row on both sides; the feature tables
    # have one row (no features), as tandem builds them.
    user_id = LazyTable(n_users + 1, DIM, dev, gen)
    user_feat = LazyTable(1, FEATURE_DIM, dev, gen)
    item_id = LazyTable(n_items + 1, DIM, dev, gen)
    item_feat = LazyTable(1, FEATURE_DIM, dev, gen)
    user_mlp = mlp(2 * DIM + 4, dev)
    item_mlp = mlp(DIM, dev)
    dense = list(user_mlp.parameters()) + list(item_mlp.parameters())
    if a.compile:
        user_mlp = torch.compile(user_mlp, dynamic=False)
        item_mlp = torch.compile(item_mlp, dynamic=False)
    opt = torch.optim.AdamW(dense, lr=LR, weight_decay=WD)
    params = sum(t.data.numel() for t in (user_id, user_feat, item_id, item_feat))
    params += sum(p.numel() for p in dense) + 1  # + the temperature, as in tandem
    counts = torch.zeros(n_items + 1, dtype=torch.float64, device=dev)
    total = [0]

    def batch():
        u = rng.integers(0, n_users, size=b)
        p = rng.integers(HISTORY, seq_len, size=b)
        hist = np.stack([seqs[u[r], p[r] - HISTORY : p[r]][::-1] for r in range(b)])
        seen = [np.unique(seqs[u[r], : p[r]]) for r in range(b)]
        width = max(len(s) for s in seen)
        seen_pad = np.zeros((b, width), dtype=np.int64)
        for r, s in enumerate(seen):
            seen_pad[r, : len(s)] = s
        return {
            "users": torch.from_numpy(u + 1),
            "hist": torch.from_numpy(hist.copy()),
            "ctx": torch.from_numpy(context(p)),
            "targets": torch.from_numpy(seqs[u, p]),
            "seen": torch.from_numpy(seen_pad),
        }

    def step(x, k):
        targets = x["targets"].to(dev)
        hist = x["hist"].to(dev)
        ctx = x["ctx"].to(dev)
        seen = x["seen"].to(dev)
        uniform = torch.randint(1, n_items + 1, (UNIFORM,), device=dev)
        cands = torch.cat([targets, uniform])
        keep = torch.rand(b, device=dev) >= ID_DROPOUT
        cand_in = torch.cat([torch.where(keep, targets, 0), uniform])
        # logQ from the streaming counts, the batch's targets counted first.
        counts.index_add_(0, targets, torch.ones(b, dtype=torch.float64, device=dev))
        total[0] += b
        p_items = (counts[targets] / total[0]).clamp_min(1e-9)
        log_q = torch.cat(
            [
                torch.log(b * p_items).float(),
                torch.full((UNIFORM,), math.log(UNIFORM / n_items), device=dev),
            ]
        )
        # Masks: accidental hits and seen items (off the label diagonal).
        uniq, inv = torch.unique(cands, return_inverse=True)
        pos = torch.searchsorted(uniq, seen).clamp_max(len(uniq) - 1)
        hit = (uniq[pos] == seen) & (seen != 0)
        seen_u = torch.zeros(b, len(uniq), dtype=torch.bool, device=dev)
        seen_u.scatter_(1, pos, hit)
        masked = seen_u[:, inv] | (cands[None, :] == targets[:, None])
        masked[torch.arange(b, device=dev), torch.arange(b, device=dev)] = False
        bias = torch.where(masked, torch.tensor(MASKED, device=dev), -log_q[None, :])

        # Gather the touched rows of each table (the user-id table only reads padding).
        rows_i, local_i, leaf_i = item_id.gather(torch.cat([hist.flatten(), cand_in]))
        rows_u, _, leaf_u = user_id.gather(torch.zeros(1, dtype=torch.long, device=dev))
        h_local = local_i[: b * HISTORY].view(b, HISTORY)
        c_local = local_i[b * HISTORY :]
        h = leaf_i[h_local]
        nonpad = (hist != 0).float().unsqueeze(-1)
        pooled = (h * nonpad).sum(1) / nonpad.sum(1).clamp_min(1.0)
        last = leaf_i[h_local[:, 0]]
        user_in = F.dropout(torch.cat([pooled, last, ctx], 1), DROPOUT)
        u = F.normalize(user_mlp(user_in), dim=-1)
        item_in = F.dropout(leaf_i[c_local], DROPOUT)
        c = F.normalize(item_mlp(item_in), dim=-1)
        logits = u @ c.T / TAU + bias
        loss = F.cross_entropy(logits, torch.arange(b, device=dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            item_id.apply(rows_i, leaf_i.grad, k)
            if leaf_u.grad is not None:
                user_id.apply(rows_u, leaf_u.grad, k)
        return loss

    batches = [batch() for _ in range(a.steps + 3)]
    for k in range(3):
        step(batches[k], k + 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for k in range(3, a.steps + 3):
        loss = step(batches[k], k + 1)
    loss.item()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - started
    out = {
        "engine": "pytorch",
        "torch": torch.__version__,
        "threads": a.threads,
        "device": str(dev),
        "compiled": a.compile,
        "parameters": params,
        "shape": {
            "users": n_users,
            "items": n_items,
            "history": HISTORY,
            "batch_size": b,
            "dim": DIM,
            "hidden": HIDDEN,
        },
        "result": {
            "steps": a.steps,
            "examples_per_sec": a.steps * b / secs,
            "ms_per_step": secs * 1000 / a.steps,
        },
    }
    if dev.type == "cuda":
        out["gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
