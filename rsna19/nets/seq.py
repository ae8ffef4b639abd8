"""``seq``: a second-stage sequence model over the per-slice embeddings of a trained image model.

A series is its slices' embeddings in slice order, (T, D). Each embedding is concatenated with its deltas to the
previous and the next slice (zero at the ends of the series and at padding), giving (T, 3D); a 2-layer
bidirectional GRU or LSTM reads it through ``pack_padded_sequence`` — padded positions are never seen, so the
output at a real position does not depend on how (or with what) the batch was padded. A linear projection of
the (T, 3D) input is added to the RNN output (a residual: the model starts close to a per-slice linear
classifier of the embedding and learns the context on top), and a linear head gives six logits per slice.

With ``logit_skip`` the model also reads the image model's own logits of each slice, ``base`` (B, T, 6): they join
the embedding as six more input features (with their neighbour deltas, so the RNN sees the neighbours' verdicts),
and the output is ``base + head(...)`` with the head initialised to zero. The model starts exactly at the image
model's predictions and learns a correction from the context. The logits mean the same thing in every fold's image
model, unlike the embeddings of image models trained apart, so held-out (``oof``) training inputs stay usable.

Input ``x`` (B, T, D), ``lengths`` (B,) [and ``base`` (B, T, 6)] → logits (B, T, 6); positions
``t >= lengths[b]`` are zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.nets.registry import register_model


def length_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) bool: True at the real positions ``t < lengths[b]``."""
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


def neighbour_deltas(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[x, x_t − x_{t−1}, x_{t+1} − x_t]`` along T; a delta is zero where either slice is missing.

    Args:
        x: (B, T, D) embeddings (padding may hold anything: it is zeroed first).
        mask: (B, T) real positions.

    Returns:
        (B, T, 3D).
    """
    m = mask.unsqueeze(-1).to(x.dtype)
    # Garbage in padded positions must not reach the real ones; `where`, not `x * m`: NaN · 0 is still NaN.
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))
    prev = torch.zeros_like(x)
    nxt = torch.zeros_like(x)
    both = m[:, 1:] * m[:, :-1]  # (B, T−1, 1): slices t and t+1 both real
    diff = (x[:, 1:] - x[:, :-1]) * both
    prev[:, 1:] = diff
    nxt[:, :-1] = diff
    return torch.cat([x, prev, nxt], dim=-1)


class SeqModel(nn.Module):
    """Deltas → 2-layer bidirectional GRU/LSTM (packed) + linear residual from the input → per-slice head.

    Args:
        in_features: embedding size D.
        hidden: RNN hidden size per direction.
        layers: RNN layers.
        rnn: ``gru`` or ``lstm``.
        dropout: dropout on the input features, between RNN layers and before the head.
        norm: LayerNorm the embeddings first (embeddings of different image models differ in scale).
        num_classes: outputs per slice (6).
        logit_skip: read the image model's logits ``base`` too and predict ``base`` + a learned correction.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 256,
        layers: int = 2,
        rnn: str = "gru",
        dropout: float = 0.1,
        norm: bool = True,
        num_classes: int = len(CLASSES),
        logit_skip: bool = False,
    ) -> None:
        super().__init__()
        if rnn not in ("gru", "lstm"):
            raise UserError(f"seq model rnn must be 'gru' or 'lstm', got {rnn!r}")
        if in_features < 1:
            raise UserError(f"seq model needs in_features >= 1 (the embedding size), got {in_features}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.logit_skip = logit_skip
        self.norm = nn.LayerNorm(in_features) if norm else nn.Identity()
        self.drop_in = nn.Dropout(dropout)
        n_in = 3 * (in_features + (num_classes if logit_skip else 0))
        cls = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = cls(
            n_in,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.residual = nn.Linear(n_in, 2 * hidden)
        self.drop_out = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)
        if logit_skip:
            # Start at the image model's predictions: the correction is zero until the context earns a say.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, 6) of embeddings ``x`` (B, T, D) with ``lengths`` (B,) real slices per series.

        ``base`` (B, T, 6): the image model's logits, required with ``logit_skip`` and refused without it.
        """
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"seq expects (B, T, {self.in_features}), got {tuple(x.shape)}")
        if self.logit_skip != (base is not None):
            raise ValueError("seq with logit_skip needs base logits (B, T, 6); without it, none")
        b, t, _ = x.shape
        lengths = lengths.to(torch.long)
        mask = length_mask(lengths.to(x.device), t)
        h = self.norm(x)
        if base is not None:
            if base.shape != (b, t, self.num_classes):
                raise ValueError(f"seq base logits must be {(b, t, self.num_classes)}, got {tuple(base.shape)}")
            h = torch.cat([h, base.to(h.dtype)], dim=-1)
        z = self.drop_in(neighbour_deltas(h, mask))  # (B, T, 3D'); LayerNorm is per position
        packed = pack_padded_sequence(z, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)  # (B, T, 2H), zeros at padding
        out = out + self.residual(z)
        logits = self.head(self.drop_out(out))
        if base is not None:
            logits = logits + base.to(logits.dtype)
        return logits * mask.unsqueeze(-1).to(logits.dtype)


@register_model(
    "seq",
    family="seq",
    description="second stage: per-slice embeddings + neighbour deltas → 2-layer BiGRU/LSTM, every slice",
    input_layout="sequence",
    pretrained=None,
)
def seq(
    in_features: int = 0,
    hidden: int = 256,
    layers: int = 2,
    rnn: str = "gru",
    drop_rate: float = 0.1,
    norm: bool = True,
    num_classes: int = len(CLASSES),
    logit_skip: bool = False,
    backbone: str | None = None,
    n_windows: int | None = None,
    n_slices: int | None = None,
    pretrained: bool = False,
    weights: str | None = None,
) -> SeqModel:
    """Sequence model over embeddings of size ``in_features`` (set from the embedding files by the trainer).

    ``backbone``, ``n_windows`` and ``n_slices`` are the image-model arguments every config passes; they are
    ignored (the image model is the one that wrote the embeddings). The long keyword list must stay: a registered
    factory's keywords are the ``model:`` keys users set in YAML (docs/extending.md).
    """
    del backbone, n_windows, n_slices
    if pretrained or weights:
        raise UserError("the seq model has no pretrained weights; set model.pretrained: false and no model.weights")
    return SeqModel(in_features, hidden, layers, rnn, drop_rate, norm, num_classes, logit_skip)
