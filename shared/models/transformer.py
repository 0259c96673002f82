"""Small transformer encoders: a sequence classifier and a causal character LM."""

from __future__ import annotations

import torch
from torch import nn

PAD_ID = 0  # token id 0 is padding for the classifier


class _TokenEmbedding(nn.Module):
    """Token embedding plus learned positional embedding: (B, T) int64 -> (B, T, d_model)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, padding_idx: int | None) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.positions = nn.Embedding(max_len, d_model)
        self.max_len = max_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len {self.max_len}")
        pos = torch.arange(seq_len, device=x.device)  # (T,)
        return self.tokens(x) + self.positions(pos)  # (B, T, D)


def _encoder(d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True
    )
    # Nested tensors (an inference fast path for padded batches) are a prototype API that warns.
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class TransformerClassifier(nn.Module):
    """Encoder-only classifier: (B, T) int64 token ids (0 = padding) -> logits (B, num_classes).

    Padding is excluded from attention (``src_key_padding_mask``) and from the
    mean pooling over positions.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_classes: int = 2,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        max_len: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = _TokenEmbedding(vocab_size, d_model, max_len, padding_idx=PAD_ID)
        self.encoder = _encoder(d_model, nhead, num_layers, dim_feedforward, dropout)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == PAD_ID  # (B, T), True = ignore
        # An all-padding row would make attention softmax over nothing (NaN); let it attend.
        pad = pad & ~pad.all(dim=1, keepdim=True)
        h = self.encoder(self.embed(x), src_key_padding_mask=pad)  # (B, T, D)
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1)  # (B, D); keep.sum >= 1 per row
        return self.head(pooled)  # (B, C)


class CharLM(nn.Module):
    """Causal transformer for next-character prediction (LEAF Shakespeare).

    ``forward`` returns the logits of the last position only, (B, vocab): the
    label of a window is the character that follows it. ``forward_all`` gives
    every position, (B, T, vocab).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 256,
        max_len: int = 80,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = _TokenEmbedding(vocab_size, d_model, max_len, padding_idx=None)
        self.encoder = _encoder(d_model, nhead, num_layers, dim_feedforward, dropout)
        self.head = nn.Linear(d_model, vocab_size)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, D)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=h.dtype)
        return self.encoder(h, mask=mask, is_causal=True)  # (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._hidden(x)[:, -1])  # (B, D) -> (B, V)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._hidden(x))  # (B, T, V)
