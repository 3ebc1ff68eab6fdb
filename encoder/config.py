"""The encoder's settings: its shape (:class:`EncoderConfig`) and how it is trained
(:class:`TrainConfig`). Plain dataclasses with no torch, so a command line can show their
defaults without loading the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    n_items: int = 1  # known items, vocabulary indices 1..n_items (0 is padding)
    n_oov_buckets: int = 64  # unknown items hash into n_items+1 .. n_items+n_oov_buckets
    n_event_types: int = 4  # view, click, add_to_cart, purchase (ids 1..4; 0 is padding)
    max_len: int = 50  # L: the newest events per user the encoder reads (the paper's L)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_ff: int = 256  # hidden width of each block's MLP
    dropout: float = 0.2  # training only
    use_event_types: bool = True  # False: items only, as in SASRec (for ablations)

    def __post_init__(self) -> None:
        assert self.n_items >= 1, f"n_items must be at least 1, got {self.n_items}"
        assert self.d_model % self.n_heads == 0, \
            f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}"

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_items + self.n_oov_buckets


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200  # upper bound; early stopping usually ends training well before
    max_minutes: float = 13.0  # bound on the training loop (Beauty: under 15 min in all)
    batch_size: int = 128
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 100
    decay: bool = True  # lr falls linearly to 0 at the budget (epochs or max_minutes)
    weight_decay: float = 0.5  # AdamW's decoupled decay: see the module docstring
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    # Which validation NDCG@10 picks the epoch: "full" ranking (what the worker does) or the
    # paper's "sampled" protocol. They peak at different epochs, so select on the one reported.
    select_protocol: str = "full"
    seed: int = 0
    negatives: int = 2048  # sampled-softmax negatives per batch; 0: softmax over every item
    # Each position also learns the items of the events after the next one, up to `horizon`
    # events ahead, each with `horizon_weight` (the next event weighs 1): see the docstring.
    horizon: int = 1
    horizon_weight: float = 0.3
    oov_replace_prob: float = 0.01  # inputs swapped for their OOV bucket, to train the buckets
    target_types: tuple[str, ...] | None = None  # None: every event is a prediction target
    exclude_history: bool | None = None  # full ranking; None: decide from the repeat share
    eval_batch_size: int = 1024
    threads: int | None = None  # torch intra-op threads; None: torch's default
