"""Encoder inference speed: one batched call against a per-user loop, on the same users.

    .venv/bin/python bench/encoder_speed.py            # about 2 minutes
    .venv/bin/python bench/encoder_speed.py --quick    # a smoke run in seconds

Measured side by side in one run, on this machine's cores:

1. ``Encoder.user_vectors`` on a batch of users (one padded forward pass) against calling it
   once per user, on the very same users. Two sets of users: real histories (the Beauty test
   users' histories, truncated to the newest L = 50, as the worker holds them), and
   full-length histories (every user has L events: the compute-bound worst case).
2. Achieved FLOP/s of the batched call as a fraction of this machine's fp32 matmul peak
   (a 2048 x 2048 matmul, measured in the same run). FLOPs are the model's useful FLOPs:
   the linear layers on real events plus causal attention over real keys; the per-user cost
   of padding, LayerNorm, GELU and gathers is counted as time, not as FLOPs.
3. Cost against the window length L (25, 50, 100, 200) and the batch size.
4. Where the batched call's time goes: torch's profiler over the real-history calls, self CPU
   time per operator, and the share spent in matrix products (where the FLOPs are) against
   everything else.

Weights are randomly initialised with the streaming default config (2 blocks, d = 64, 2 heads)
and a Beauty-sized vocabulary: speed does not depend on their values (``--checkpoint`` uses a
trained model instead). Writes bench/results/encoder_speed.{json,png} with every timing
sample, merges ``encoder_batched_vs_loop`` and ``encoder_fraction_of_matmul_peak`` (both from
the real-history users) into bench/results/summary.json, and prints the ratio last.
``--quick`` writes encoder_speed_quick.* and touches summary.json only with ``--summary``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import torch
from _common import (
    add_output_options,
    machine_facts,
    matmul_peak,
    merge_summary,
    summary_path,
    write_json,
)

from encoder.config import EncoderConfig
from encoder.data import (
    default_datasets_dir,
    encode_split,
    leave_one_out,
    load_dataset,
    user_sequences,
)
from encoder.inference import Encoder
from encoder.model import EncoderModel
from encoder.train import build_vocabulary
from encoder.vocab import Vocabulary

Batch = tuple[list[np.ndarray], list[np.ndarray]]


def model_flops(lengths: np.ndarray, cfg: EncoderConfig) -> float:
    """Useful FLOPs of one user_vectors call: linear layers on real events, causal attention
    over real keys; the last block computes k, v for every event but the rest only for the
    newest event."""
    d, f = cfg.d_model, cfg.d_ff
    n = np.minimum(lengths, cfg.max_len).astype(np.float64)
    tokens = n.sum()
    linear = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * f  # qkv, out projection, MLP
    full_block = tokens * linear + (2 * 2 * d * n * (n + 1) / 2).sum()
    last_block = tokens * 2 * d * 2 * d + len(n) * (2 * d * d + 2 * d * d + 2 * 2 * d * f) \
        + (2 * 2 * d * n).sum()
    return float((cfg.n_layers - 1) * full_block + last_block)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def make_encoder(n_items: int, max_len: int, checkpoint: Path | None = None) -> Encoder:
    if checkpoint is not None:
        return Encoder.load(checkpoint)
    torch.manual_seed(0)
    model = EncoderModel(EncoderConfig(n_items=n_items, max_len=max_len, dropout=0.0))
    vocab = Vocabulary([str(i) for i in range(n_items)], model.cfg.n_oov_buckets)
    return Encoder(model, vocab, np.zeros(model.cfg.vocab_size, dtype=np.int64), "bench")


def real_histories(n_users: int, seed: int) -> tuple[Batch, int, str]:
    """Histories of randomly chosen Beauty test users (their real lengths), as indices."""
    try:
        rows = load_dataset("beauty")
    except ValueError as exc:
        print(f"no Beauty data ({exc}); using synthetic lengths", file=sys.stderr)
        rng = np.random.default_rng(seed)
        lengths = np.minimum(rng.geometric(1 / 8, size=n_users) + 2, 200)
        items = [rng.integers(1, 12_000, size=k) for k in lengths]
        return (items, [np.full(k, 4) for k in lengths]), 12_000, "synthetic (geometric)"
    vocab = build_vocabulary(rows, 64)
    test = encode_split(leave_one_out(user_sequences(rows)), vocab).test
    chosen = np.random.default_rng(seed).choice(len(test), size=n_users, replace=False)
    return ([test.items[u] for u in chosen], [test.types[u] for u in chosen]), len(vocab), \
        f"beauty test histories ({default_datasets_dir()})"


def full_histories(n_users: int, length: int, n_items: int, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    items = [rng.integers(1, n_items + 1, size=length) for _ in range(n_users)]
    return items, [rng.integers(1, 5, size=length) for _ in range(n_users)]


def batched_vs_loop(encoder: Encoder, batch: Batch, repeats: int, loop_repeats: int,
                    peak: float) -> dict[str, Any]:
    items, types = batch
    batched = timed(lambda: encoder.user_vectors(items, types), repeats)
    pairs = list(zip(items, types, strict=True))
    loop = timed(lambda: [encoder.user_vectors([i], [t]) for i, t in pairs], loop_repeats,
                 warmup=1)
    lengths = np.fromiter((len(i) for i in items), dtype=np.int64)
    flops = model_flops(lengths, encoder.config)
    b, lp = statistics.median(batched), statistics.median(loop)
    return {
        "users": len(items),
        "events_read": int(np.minimum(lengths, encoder.config.max_len).sum()),
        "mean_length": float(np.minimum(lengths, encoder.config.max_len).mean()),
        "batched_seconds": batched, "loop_seconds": loop,
        "batched_median_s": b, "loop_median_s": lp,
        "us_per_user_batched": b / len(items) * 1e6, "us_per_user_loop": lp / len(items) * 1e6,
        "ratio": lp / b,
        "model_flops": flops, "flops_per_second": flops / b, "fraction_of_peak": flops / b / peak,
    }


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::baddbmm")


def op_profile(encoder: Encoder, batch: Batch, repeats: int) -> dict[str, Any]:
    """Self CPU time per torch operator over ``repeats`` batched calls, biggest first."""
    from torch.profiler import ProfilerActivity, profile

    items, types = batch
    encoder.user_vectors(items, types)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            encoder.user_vectors(items, types)
    ops = [(e.key, e.self_cpu_time_total / 1e3 / repeats, e.count // repeats)
           for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in ops)
    ops.sort(key=lambda o: -o[1])
    matmul = sum(ms for name, ms, _ in ops if name in MATMUL_OPS)
    return {
        "repeats": repeats, "ms_per_call": total,
        "matmul_share": matmul / total if total else 0.0,
        "matmul_ops": list(MATMUL_OPS),
        "ops": [{"op": name, "ms_per_call": ms, "calls_per_call": n,
                 "share": ms / total if total else 0.0} for name, ms, n in ops[:25]],
    }


def sweep(lengths: list[int], batch_sizes: list[int], n_items: int, quick: bool,
          peak: float) -> list[dict[str, Any]]:
    cells = []
    for L in lengths:
        encoder = make_encoder(n_items, L)
        for B in batch_sizes:
            items, types = full_histories(B, L, n_items, seed=L + B)
            repeats = 2 if quick else max(3, min(20, 200_000 // (B * L)))
            samples = timed(lambda i=items, t=types, e=encoder: e.user_vectors(i, t), repeats)
            median = statistics.median(samples)
            flops = model_flops(np.full(B, L), encoder.config)
            cells.append({"L": L, "batch": B, "seconds": samples, "median_s": median,
                          "us_per_user": median / B * 1e6, "flops_per_second": flops / median,
                          "fraction_of_peak": flops / median / peak})
            print(f"  L={L:3d} B={B:4d}: {median / B * 1e6:8.1f} us/user, "
                  f"{flops / median / 1e9:6.1f} GFLOP/s", file=sys.stderr)
    return cells


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    names = list(result["batched_vs_loop"])
    x = np.arange(len(names))
    loop = [result["batched_vs_loop"][n]["us_per_user_loop"] for n in names]
    batched = [result["batched_vs_loop"][n]["us_per_user_batched"] for n in names]
    ax.bar(x - 0.2, loop, 0.4, label="per-user loop")
    ax.bar(x + 0.2, batched, 0.4, label="one batched call")
    for i, n in enumerate(names):
        ax.annotate(f"{result['batched_vs_loop'][n]['ratio']:.1f}x", (i, loop[i]),
                    ha="center", va="bottom")
    ax.set_xticks(x, [f"{n}\n(B={result['batched_vs_loop'][n]['users']})" for n in names])
    ax.set(ylabel="microseconds per user", title="batched vs per-user loop (same users)")
    ax.legend()
    cells = result["sweep"]
    for L in sorted({c["L"] for c in cells}):
        row = [c for c in cells if c["L"] == L]
        axes[1].plot([c["batch"] for c in row], [c["us_per_user"] for c in row], marker="o",
                     label=f"L={L}")
        axes[2].plot([c["batch"] for c in row], [c["fraction_of_peak"] for c in row],
                     marker="o", label=f"L={L}")
    axes[1].set(xscale="log", yscale="log", xlabel="batch size (users)",
                ylabel="microseconds per user", title="cost vs L and batch (full histories)")
    peak = result["matmul_peak"]["flops_per_second"] / 1e9
    axes[2].set(xscale="log", xlabel="batch size (users)", ylabel="fraction of matmul peak",
                title=f"achieved FLOP/s / matmul peak ({peak:.0f} GFLOP/s)")
    axes[1].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats")
    parser.add_argument("--users", type=int, default=256, help="users per batch (worker-sized)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [all cores]")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="time a trained checkpoint instead of random weights")
    add_output_options(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    peak_before = matmul_peak(repeats=5 if args.quick else 10)
    users = min(args.users, 64) if args.quick else args.users
    real, n_items, source = real_histories(users, seed=0)
    encoder = make_encoder(n_items, 50, args.checkpoint)
    peak = peak_before["flops_per_second"]
    repeats, loop_repeats = (3, 1) if args.quick else (20, 5)
    comparisons = {
        "real histories": batched_vs_loop(encoder, real, repeats, loop_repeats, peak),
        "full histories": batched_vs_loop(
            encoder, full_histories(users, encoder.config.max_len, encoder.config.n_items, 1),
            repeats, loop_repeats, peak),
    }
    for name, c in comparisons.items():
        print(f"{name}: {c['us_per_user_batched']:.1f} us/user batched, "
              f"{c['us_per_user_loop']:.1f} us/user looped, {c['ratio']:.1f}x; "
              f"{c['flops_per_second'] / 1e9:.1f} GFLOP/s = {c['fraction_of_peak']:.0%} of "
              f"peak", file=sys.stderr)
    profiled = op_profile(encoder, real, repeats)
    print(f"profile of the batched call: {profiled['ms_per_call']:.1f} ms of operator time, "
          f"{profiled['matmul_share']:.0%} in matrix products; biggest: " + ", ".join(
              f"{o['op']} {o['share']:.0%}" for o in profiled["ops"][:5]), file=sys.stderr)
    lengths = [25, 50] if args.quick else [25, 50, 100, 200]
    batch_sizes = [1, 16, 64] if args.quick else [1, 16, 64, 256, 1024]
    cells = sweep(lengths, batch_sizes, n_items, args.quick, peak)
    peak_after = matmul_peak(repeats=5 if args.quick else 10)

    result = {
        "benchmark": "encoder_speed", "quick": args.quick, "machine": machine_facts(),
        "model_config": asdict(encoder.config),
        "weights": str(args.checkpoint) if args.checkpoint else "random init",
        "users_source": source,
        "matmul_peak": peak_before, "matmul_peak_after": peak_after,
        "flops_definition": model_flops.__doc__,
        "batched_vs_loop": comparisons,
        "profile_real_histories": profiled,
        "sweep": cells,
    }
    suffix = "_quick" if args.quick else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / f"encoder_speed{suffix}.json", result)
    plot(result, args.out_dir / f"encoder_speed{suffix}.png")
    headline = comparisons["real histories"]
    summary = summary_path(args)
    if summary is not None:
        merge_summary(summary, encoder_batched_vs_loop=round(headline["ratio"], 2),
                      encoder_fraction_of_matmul_peak=round(headline["fraction_of_peak"], 3))
    print(f"encoder batched vs per-user loop: {headline['ratio']:.1f}x "
          f"(fraction of matmul peak {headline['fraction_of_peak']:.2f})")


if __name__ == "__main__":
    main()
