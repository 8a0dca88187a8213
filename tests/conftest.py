"""Shared fixtures: a few tiny rendered synthetic videos and the cache extracted from them."""

from pathlib import Path

import pytest
import torch

from extract.contract.config import from_dict

torch.set_num_threads(1)  # small ops: a second thread mostly waits (and tests may run beside other work)


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


def tiny_config(root: Path, cache_root: Path, **sections):
    """12 videos of 3-4 s at 48x48, 8 frames each, tiny random encoders, inline decoding."""
    data = {
        "dataset": {"root": str(root)},
        "synthetic": {
            "videos": {"train": 6, "test_iid": 3, "test_ood": 3},
            "height": 48,
            "width": 48,
            "min_seconds": 3.0,
            "max_seconds": 4.0,
        },
        "frames": {"num_frames": 8, "decode_workers": 0},
        "encoders": {"batch_frames": 32},
        "cache": {"root": str(cache_root)},
        "dictionaries": {
            "confounder": {"source": "clip/bg", "size": 4},
            # ECRL's default Z (Sec. 4.2.1: k-means++ and PCA, cluster means at their natural scale)
            "confounder_paper": {"source": "clip/bg", "size": 4, "pca": 8, "spherical": False, "init": "kmeans++"},
            "global": {"source": "clip/frame", "size": 6},
        },
        "train": {"epochs": 2, "batch_size": 4, "runs_root": str(cache_root / "runs")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """12 rendered videos shared by the session (tests that damage files copy them first)."""
    from extract.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(tiny_config(root, root).synthetic, root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_cache(world, tmp_path_factory):
    """(config, store path) of the extracted tiny world; read-only for tests."""
    from extract.pipeline import extract

    cfg = tiny_config(world, tmp_path_factory.mktemp("cache"))
    summary = extract(cfg, progress=False)
    return cfg, summary.store


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
