"""The user encoder, all of it in this file: SASRec-style causal self-attention with event types.

A user's recent events go in as two left-padded id tensors of shape (B, T), oldest to newest:
item indices (0 = padding, 1..n_items = known items, then hashed out-of-vocabulary buckets) and
event-type ids (0 = padding, 1..4 = view, click, add_to_cart, purchase). Out comes one d_model
vector per event; the newest event's is the user vector, and an item's score is the dot product
of a vector with that item's embedding (the same table that embeds the inputs).

Padding contract: left padding, so the newest event is always at column T-1. Positions count
from the end of the window, so one history padded to any T gives the same outputs, and a real
event never attends to a padding key. Dropout acts in training only.

Where the time goes: histories are mostly short (median 6 events on the Amazon data, L = 50), so
a padded (B, T) batch is mostly padding. The token-wise layers (embeddings, LayerNorm, the
linear layers: nearly all the FLOPs) therefore run on the N real events only, packed into an
(N, d) tensor. Attention needs the (B, T) grid, so each block scatters its q, k, v into it and
gathers the outputs back; rows are attended in chunks, each cut to the longest history in the
chunk, which makes attention cheap too when rows come sorted by length (inference sorts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoder.config import EncoderConfig

ATTENTION_CHUNK_ROWS = 64  # rows per attention call: few calls, little padding when sorted


@dataclass(frozen=True)
class Layout:
    """Where the N real events of a left-padded (B, T) batch sit, built once per forward."""

    B: int
    T: int
    events: torch.Tensor | None  # (N,) each real event's index in the B*T grid; None: no padding
    newest: torch.Tensor  # (B,) packed index of each row's newest event
    chunks: list[tuple[int, int, int, torch.Tensor | None]]  # (row0, row1, T_c, mask | None)

    @staticmethod
    def of(items: torch.Tensor) -> Layout:
        B, T = items.shape
        real = items != 0  # (B, T)
        assert bool(real[:, -1].all()), \
            "every row needs its newest event in the last column (left padding, no empty rows)"
        lengths = real.sum(dim=1)  # (B,)
        dense = bool((lengths == T).all())
        events = None if dense else real.flatten().nonzero().squeeze(1)
        newest = lengths.cumsum(0) - 1
        chunks: list[tuple[int, int, int, torch.Tensor | None]] = []
        if dense:  # no padding anywhere: one causal call over the whole batch
            return Layout(B, T, events, newest, [(0, B, T, None)])
        for row0 in range(0, B, ATTENTION_CHUNK_ROWS):
            row1 = min(row0 + ATTENTION_CHUNK_ROWS, B)
            T_c = int(lengths[row0:row1].max())
            mask = None
            if not bool((lengths[row0:row1] == T_c).all()):
                # Query t sees the real keys s <= t. A padding query sees only itself, which
                # keeps its softmax finite; nothing real ever reads its output.
                key_real = real[row0:row1, T - T_c:]  # (B_c, T_c)
                causal = torch.ones(T_c, T_c, dtype=torch.bool, device=items.device).tril()
                eye = torch.eye(T_c, dtype=torch.bool, device=items.device)
                mask = (causal & key_real[:, None, None, :]) | eye  # (B_c, 1, T_c, T_c)
            chunks.append((row0, row1, T_c, mask))
        return Layout(B, T, events, newest, chunks)

    def to_grid(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at padding."""
        if self.events is None:
            return packed.view(self.B, self.T, -1)
        grid = packed.new_zeros(self.B * self.T, packed.shape[1])
        grid[self.events] = packed
        return grid.view(self.B, self.T, -1)

    def to_packed(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        flat = grid.reshape(self.B * self.T, -1)
        return flat if self.events is None else flat[self.events]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, layout: Layout, newest_only: bool) -> torch.Tensor:
        """(N, d) packed events -> (N, d), or (B, d) for each row's newest event only."""
        C = x.shape[1]
        grid = layout.to_grid(self.qkv(x))  # (B, T, 3d)
        outputs = []
        for row0, row1, T_c, mask in layout.chunks:
            q, k, v = torch.split(grid[row0:row1, layout.T - T_c:], C, dim=2)  # (B_c, T_c, d)
            if newest_only:  # one query per row, which may see every key: no causal mask
                q = q[:, -1:]
                mask = mask[:, :, -1:] if mask is not None else None
            y = F.scaled_dot_product_attention(
                self._heads(q), self._heads(k), self._heads(v), attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and not newest_only)  # (B_c, nh, T_q, hs)
            outputs.append(y.transpose(1, 2).flatten(2))  # (B_c, T_q, d)
        if newest_only:
            y = torch.cat(outputs)[:, -1]  # (B, d)
        elif len(outputs) == 1 and layout.events is None:
            y = outputs[0].reshape(layout.B * layout.T, C)  # dense: already packed
        else:
            out = grid.new_zeros(layout.B, layout.T, C)
            for (row0, row1, T_c, _), y_c in zip(layout.chunks, outputs, strict=True):
                out[row0:row1, layout.T - T_c:] = y_c
            y = layout.to_packed(out)  # (N, d)
        out_proj: torch.Tensor = self.resid_dropout(self.proj(y))
        return out_proj

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.reshape(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.dropout(self.proj(F.gelu(self.fc(x))))
        return y


class Block(nn.Module):
    """Pre-LayerNorm transformer block (pmixer measured Pre-LN at least as good as SASRec's
    post-norm on the Amazon data, and it trains more stably)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, layout: Layout, newest_only: bool = False) -> torch.Tensor:
        attended: torch.Tensor = self.attn(self.ln_1(x), layout, newest_only)
        x = (x[layout.newest] if newest_only else x) + attended
        mlp_out: torch.Tensor = self.mlp(self.ln_2(x))
        return x + mlp_out


class EncoderModel(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=0)
        self.type_emb = nn.Embedding(cfg.n_event_types + 1, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections shrink with depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        with torch.no_grad():  # OOV buckets start neutral: an unknown item says little
            self.item_emb.weight[1 + cfg.n_items:].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def encode(self, items: torch.Tensor, types: torch.Tensor,
               newest_only: bool = False) -> torch.Tensor:
        """Hidden states of the real events, packed row-major: (N, d); (B, d) if newest_only."""
        B, T = items.shape
        assert self.cfg.max_len >= T, \
            f"cannot encode {T} events, the model was built for at most {self.cfg.max_len}"
        assert types.shape == items.shape, f"types {tuple(types.shape)} != items {(B, T)}"
        layout = Layout.of(items)
        # Positions count from the end of the window: the newest event is always max_len - 1.
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=items.device)
        pos = pos.expand(B, T)
        real = items != 0
        x = self.item_emb(items[real]) + self.pos_emb(pos[real])  # (N, d)
        if self.cfg.use_event_types:
            x = x + self.type_emb(types[real])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block(x, layout, newest_only=newest_only and last)
        out: torch.Tensor = self.ln_f(x)
        return out

    def forward(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """(B, T, d) hidden states of left-padded (B, T) ids, zeros at padding."""
        hidden = self.encode(items, types)
        out = hidden.new_zeros(*items.shape, hidden.shape[1])
        out[items != 0] = hidden
        return out

    def user_vectors(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """(B, d): each row's newest output; the last block computes that position only."""
        return self.encode(items, types, newest_only=True)

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d): the known items; row j is vocabulary index j + 1."""
        return self.item_emb.weight[1 : 1 + self.cfg.n_items]

    def scores(self, vectors: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Dot products of (B, d) vectors with item embeddings.

        ``candidates`` None: every known item, (B, n_items), column j = item index j + 1.
        (C,) indices: the same candidates for every row, (B, C). (B, C): per-row candidates.
        """
        if candidates is None:
            return vectors @ self.item_embeddings().T
        emb: torch.Tensor = self.item_emb(candidates)  # (C, d) or (B, C, d)
        if candidates.dim() == 1:
            return vectors @ emb.T
        return torch.einsum("bd,bcd->bc", vectors, emb)

    def loss(self, items: torch.Tensor, types: torch.Tensor, targets: torch.Tensor,
             negatives: torch.Tensor | None = None,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax cross-entropy for the items that follow each event.

        ``targets`` (B, T) holds the next item's index after each position, 0 where there is
        none or it is left out. ``targets`` (B, T, K) holds the items of the next K events
        (column k: k + 1 events ahead); each target's cross-entropy counts ``weights[k]`` times
        (default 1), and the sum is divided by the number of next-event targets, so with (B, T)
        targets the loss is their mean cross-entropy. Only
        positions with a target are projected onto the item table, since the logits are most
        of the training cost, and every column shares those logits.

        With ``negatives`` None the softmax runs over every known item; with a (S,) tensor of
        item indices it runs over the true item and those S shared negatives (a sampled
        softmax; a negative equal to the true item is masked out). Uniform negatives need no
        log-Q correction: every item is as likely.
        """
        if targets.dim() == 2:
            targets = targets[:, :, None]
        assert targets.shape[:2] == items.shape, \
            f"targets {tuple(targets.shape)} do not match items {tuple(items.shape)}"
        K = targets.shape[2]
        if weights is None:
            weights = torch.ones(K)
        assert weights.shape == (K,), f"weights {tuple(weights.shape)}, targets have K = {K}"
        hidden = self.encode(items, types)  # (N, d)
        wanted = targets[items != 0]  # (N, K), same packed order as hidden
        keep = (wanted != 0).any(dim=1)
        h, wanted = hidden[keep], wanted[keep]  # (N_t, d), (N_t, K)
        has_target = wanted != 0
        positive = (h[:, None, :] * self.item_emb(wanted)).sum(dim=2)  # (N_t, K)
        if negatives is None:  # log of the softmax's denominator, once for every column
            log_z = torch.logsumexp(h @ self.item_embeddings().T, dim=1, keepdim=True)
        else:
            # Over the true item and the negatives other than it: a negative equal to the
            # true item drops out. With c such copies among the S negatives the denominator
            # is exp(log_z_neg) + (1 - c) exp(positive); c = 0 adds the true item, c = 1
            # swaps its copy for it, and c > 1 removes the extra copies.
            log_z_neg = torch.logsumexp(h @ self.item_emb(negatives).T, dim=1, keepdim=True)
            copies = torch.bincount(negatives, minlength=self.cfg.vocab_size)[wanted]  # (N_t, K)
            gap = positive - log_z_neg
            log_z = torch.where(
                copies == 0, log_z_neg + F.softplus(gap),
                log_z_neg + torch.log((1 - (copies - 1) * gap.exp()).clamp_min(1e-30)))
        cross_entropy = (log_z - positive) * has_target  # (N_t, K)
        # Per next-event target, so a column's weight is a weight per event wherever it has
        # fewer targets (near a history's end), never inflated to a whole column's.
        loss: torch.Tensor = ((cross_entropy.sum(dim=0) * weights).sum()
                              / has_target[:, 0].sum().clamp_min(1))
        return loss
