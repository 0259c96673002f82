"""Small pre-norm transformers: a sequence classifier and a local-attention causal character LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0  # token id 0 is padding for the classifier


class _TokenEmbedding(nn.Module):
    """Token embedding (0 = padding) plus learned positional embedding: (B, T) int64 -> (B, T, d_model)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.positions = nn.Embedding(max_len, d_model)
        self.max_len = max_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len {self.max_len}")
        pos = torch.arange(seq_len, device=x.device)  # (T,)
        return self.tokens(x) + self.positions(pos)  # (B, T, D)


class _SelfAttention(nn.Module):
    """Multi-head self-attention over every position whose key is kept: (B, T, D), keep (B, T) -> (B, T, D)."""

    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, dh)
        h = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, dh)
        return self.out(h.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block: self-attention (`attn`), then a GELU feed-forward layer."""

    def __init__(self, attn: nn.Module, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = attn
        self.ff = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim_feedforward, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *attn_args: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), *attn_args))
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerClassifier(nn.Module):
    """Encoder-only classifier: (B, T) int64 token ids (0 = padding) -> logits (B, num_classes).

    Padding is excluded from attention and from the mean pooling over positions, so trailing
    padding does not change the logits.
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
        self.embed = _TokenEmbedding(vocab_size, d_model, max_len)
        self.blocks = nn.ModuleList(
            _Block(_SelfAttention(d_model, nhead, dropout), d_model, dim_feedforward, dropout)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x != PAD_ID  # (B, T)
        # An all-padding row would make attention softmax over nothing (NaN); let it attend.
        keep = keep | ~keep.any(dim=1, keepdim=True)
        h = self.embed(x)  # (B, T, D)
        for block in self.blocks:
            h = block(h, keep)
        weights = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (self.norm(h) * weights).sum(dim=1) / weights.sum(dim=1)  # (B, D); >= 1 position per row
        return self.head(pooled)  # (B, C)


class _LocalSelfAttention(nn.Module):
    """Causal self-attention over the last `span` positions, with a learned bias per head and offset.

    Position enters only as the offset between query and key, so an output depends on where a
    token is relative to it, never on where the sequence happens to start. The sequence is cut
    into blocks of `span` positions; a block's queries attend to its own and the previous
    block's keys, so the cost grows linearly with the length.
    """

    def __init__(self, d_model: int, nhead: int, span: int, dropout: float) -> None:
        super().__init__()
        self.nhead, self.span, self.dropout = nhead, span, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        # ALiBi's recency prior (Press et al. 2022) as the starting bias: head h first weighs a key
        # o positions back by exp(-o / 2^h), so the heads start out looking at different ranges.
        slopes = 2.0 ** -torch.arange(nhead, dtype=torch.float32)  # (H,)
        self.offset_bias = nn.Parameter(-slopes[:, None] * torch.arange(span, dtype=torch.float32))  # (H, span)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        w, blocks = self.span, -(-t // self.span)
        qkv = self.qkv(x)  # (B, T, 3D)
        if blocks * w != t:
            qkv = F.pad(qkv, (0, 0, 0, blocks * w - t))  # (B, n * w, 3D)
        q, k, v = qkv.view(b, blocks, w, 3, self.nhead, d // self.nhead).permute(3, 0, 4, 1, 2, 5)  # (B, H, n, w, dh)
        k, v = _with_previous_block(k), _with_previous_block(v)  # (B, H, n, 2w, dh)
        scores = (q * (d // self.nhead) ** -0.5) @ k.transpose(-1, -2)  # (B, H, n, w, 2w)
        scores += self._bias(blocks, q.dtype)
        attn = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        h = (attn @ v).permute(0, 2, 3, 1, 4).reshape(b, blocks * w, d)[:, :t]  # (B, T, D)
        return self.out(h)

    def _bias(self, blocks: int, dtype: torch.dtype) -> torch.Tensor:
        """(H, n, w, 2w): the learned bias for keys 0..span-1 positions back, -inf for every other key."""
        w = self.span
        query = torch.arange(w, device=self.offset_bias.device)[:, None] + w  # position in [previous, own] block
        offset = query - torch.arange(2 * w, device=self.offset_bias.device)[None, :]  # (w, 2w)
        inside = (offset >= 0) & (offset < w)
        bias = self.offset_bias[:, offset.clamp(0, w - 1)].masked_fill(~inside, float("-inf"))  # (H, w, 2w)
        bias = bias.unsqueeze(1).repeat(1, blocks, 1, 1)  # (H, n, w, 2w)
        bias[:, 0, :, :w] = float("-inf")  # the first block has no previous block
        return bias.to(dtype)


def _with_previous_block(t: torch.Tensor) -> torch.Tensor:
    """(B, H, n, w, dh) -> (B, H, n, 2w, dh): each block preceded by the one before (zeros for the first)."""
    previous = F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    return torch.cat([previous, t], dim=3)


class CharLM(nn.Module):
    """Causal transformer for next-character prediction (LEAF Shakespeare): (B, T) ids -> (B, T, vocab).

    The logits at position t predict token t + 1 from at most the last ``max_len`` tokens up to t:
    each layer attends ``span = (max_len - 1) // num_layers + 1`` positions back, so the stack
    sees ``num_layers * (span - 1) + 1 <= max_len`` tokens, and positions are relative. A
    prediction therefore equals the one the model makes on the ``max_len``-token window alone,
    so one pass over a long chunk scores every window in it (what the data layer relies on).
    Sequences may be any length.
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
        span = (max_len - 1) // num_layers + 1
        self.receptive_field = num_layers * (span - 1) + 1
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.Sequential(
            *(_Block(_LocalSelfAttention(d_model, nhead, span, dropout), d_model, dim_feedforward, dropout)
              for _ in range(num_layers))
        )  # fmt: skip
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))))  # (B, T) -> (B, T, D) -> (B, T, V)
