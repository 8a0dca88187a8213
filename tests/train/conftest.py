"""Stage 2's fixtures: a cache store written through the contract from random arrays (tests/train/random_cache.py),
its configuration, random batches sized from a HeadContext, and the explicit sums heads are checked against.

Nothing here imports an encoder, renders or decodes a video, or extracts: the store is what stage 2 reads."""

import dataclasses
from pathlib import Path

import pytest
import torch

from extract.contract.config import from_dict
from tests.train.random_cache import DATASET, RandomCache, write_random_cache


def random_config(runs_root: Path, cache_root: Path | None = None, **sections):
    """The defaults of every section, 2 epochs of batches of 4 (the tiny cache's training), runs under `runs_root`;
    `dataset.name` is the random store's dataset (so `cache.root` + a pointer find it)."""
    data = {
        "dataset": {"name": DATASET, "root": str(runs_root / "no-videos")},
        "train": {"epochs": 2, "batch_size": 4, "runs_root": str(runs_root)},
    }
    if cache_root is not None:
        data["cache"] = {"root": str(cache_root)}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


@pytest.fixture(scope="session")
def random_store(tmp_path_factory) -> RandomCache:
    """The default random world's store and the truth it was drawn from; read-only for tests."""
    return write_random_cache(tmp_path_factory.mktemp("random-cache"))


@pytest.fixture(scope="session")
def random_cache(random_store, tmp_path_factory):
    """(config, store path) of the random store, as `tiny_cache` gives the extracted one; read-only for tests."""
    root = random_store.store.parents[1]
    return random_config(tmp_path_factory.mktemp("runs"), cache_root=root), random_store.store


def with_train(cfg, **train):
    """`cfg` with some `train` keys replaced."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def random_batch(ctx, batch_size: int, seed: int = 1, short: int = 2):
    """Random fp16 features for `batch_size` videos sized from a HeadContext; video 0's last `short`
    frames are masked; labels are class ids or multi-hot by the context's task."""
    from train.heads import Batch

    g = torch.Generator().manual_seed(seed)
    B, L, C = batch_size, ctx.num_frames, ctx.num_classes
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L - short :] = False  # a shorter video
    if ctx.multi_label:
        labels = (torch.rand(B, C, generator=g) < 0.4).float()
    else:
        labels = torch.randint(0, C, (B,), generator=g)
    return Batch(
        vp=torch.randn(B, L, ctx.clip_dim, generator=g).half(),
        v=torch.randn(B, L, ctx.video_dim, generator=g).half(),
        fg=torch.randn(B, L, ctx.clip_dim, generator=g).half(),
        bg=torch.randn(B, L, ctx.clip_dim, generator=g).half(),
        mask=mask,
        t0=ctx.t0,
        dictionaries=ctx.dictionaries,
        labels=labels,
    )


def explicit_class_attention(pool, queries: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`ClassCrossAttention` one video, class, head and frame at a time: f_c = LN(q_c + W_o [Σ_l a^h_cl W_v^h x_l]_h),
    q = LN(queries), a^h_cl = softmax over real frames of (W_q^h q_c) · (W_k^h x_l) / √(d / heads).
    queries (B, C, d), frames (B, L, d), mask (B, L) -> (B, C, d)."""
    import math

    attn = pool.attn
    B, C, d = queries.shape
    H = attn.num_heads
    dh = d // H
    w_q, w_k, w_v = attn.in_proj_weight.split(d)
    b_q, b_k, b_v = attn.in_proj_bias.split(d)

    def norm(x, ln):
        mean, var = x.mean(), ((x - x.mean()) ** 2).mean()
        return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    out = torch.zeros(B, C, d)
    for b in range(B):
        real = [j for j in range(frames.shape[1]) if mask[b, j]]
        for c in range(C):
            q = norm(queries[b, c], pool.norm_q)
            mixed = torch.zeros(d)
            for h in range(H):
                rows = slice(h * dh, (h + 1) * dh)
                qh = w_q[rows] @ q + b_q[rows]
                scores = torch.stack([qh @ (w_k[rows] @ frames[b, j] + b_k[rows]) / math.sqrt(dh) for j in real])
                a = torch.softmax(scores, 0)
                mixed[rows] = sum(a[i] * (w_v[rows] @ frames[b, j] + b_v[rows]) for i, j in enumerate(real))
            out[b, c] = norm(q + attn.out_proj.weight @ mixed + attn.out_proj.bias, pool.norm_out)
    return out


def explicit_readout(readout, f: torch.Tensor) -> torch.Tensor:
    """`ClassReadout` by hand: logit_bc = Σ_d w_cd f_bcd + b_c, f (B, C, d) -> (B, C)."""
    B, C, _ = f.shape
    rows = [torch.stack([readout.weight[c] @ f[b, c] + readout.bias[c] for c in range(C)]) for b in range(B)]
    return torch.stack(rows)
