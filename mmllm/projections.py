"""The learned glue.

* Input projections map encoder features ``(B, T, D_enc)`` to LLM embeddings ``(B, T', D_llm)``:
  ``linear`` and ``mlp`` keep the token count; ``resampler`` cross-attends ``num_tokens`` learned
  queries to the features (Flamingo/Perceiver style) and so fixes the token count.
* The output projection maps the hidden states of one group of ``k`` signal tokens ``(B, k, D_llm)``
  (plus, optionally, the signal tokens' own embeddings) to exactly the decoder's conditioning
  ``(B, L, D_dec)``: a small transformer decoder whose ``L`` learned queries attend to the signal
  states (NExT-GPT's output projector).
"""

from __future__ import annotations

import torch
from torch import nn

from mmllm.config import InputProjectionConfig, OutputProjectionConfig


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, dropout: float = 0.0):
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += [nn.GELU(), nn.Dropout(dropout)]
        super().__init__(*layers)


def _attention_width(width: int, cfg: InputProjectionConfig | OutputProjectionConfig) -> int:
    """``width`` checked for ``cfg``'s attention heads (each head gets ``width / num_heads`` dims)."""
    if cfg.num_heads < 1 or width % cfg.num_heads:
        raise ValueError(f"num_heads={cfg.num_heads} does not divide the attention width {width}; choose num_heads "
                         f"among the divisors of {width}, or set hidden_dim to a multiple of {cfg.num_heads}")
    return width


class Resampler(nn.Module):
    """``num_tokens`` learned queries cross-attending to the input tokens, then a feed-forward."""

    def __init__(self, in_dim: int, out_dim: int, cfg: InputProjectionConfig):
        super().__init__()
        width = _attention_width(cfg.hidden_dim or out_dim, cfg)
        self.num_tokens = cfg.num_tokens
        self.inp = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, width) * width**-0.5)
        layer = nn.TransformerDecoderLayer(
            width, cfg.num_heads, dim_feedforward=4 * width, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, cfg.num_layers, norm=nn.LayerNorm(width))
        self.out = nn.Linear(width, out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        memory = self.inp(feats)
        queries = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1)
        return self.out(self.blocks(queries, memory))


class InputProjection(nn.Module):
    def __init__(self, in_dim: int, in_tokens: int, out_dim: int, cfg: InputProjectionConfig):
        super().__init__()
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, cfg.kind
        if cfg.kind == "resampler":
            if cfg.num_tokens < 1:
                raise ValueError("a resampler needs num_tokens >= 1")
            self.net: nn.Module = Resampler(in_dim, out_dim, cfg)
            self.num_tokens = cfg.num_tokens
        else:
            if cfg.num_tokens not in (0, in_tokens):
                raise ValueError(
                    f"a {cfg.kind} projection keeps the encoder's {in_tokens} tokens; "
                    f"num_tokens={cfg.num_tokens} needs kind: resampler"
                )
            self.num_tokens = in_tokens
            if cfg.kind == "linear":
                self.net = nn.Linear(in_dim, out_dim)
            else:
                self.net = MLP(in_dim, cfg.hidden_dim or out_dim, out_dim, max(cfg.num_layers, 2), cfg.dropout)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"input projection expects features of width {self.in_dim}, got {tuple(feats.shape)}")
        return self.net(feats)


class OutputProjection(nn.Module):
    def __init__(self, llm_dim: int, num_signal: int, out_shape: tuple[int, int], cfg: OutputProjectionConfig):
        super().__init__()
        self.num_signal = num_signal
        self.out_shape = tuple(out_shape)
        self.use_token_embeddings = cfg.use_token_embeddings
        width = _attention_width(cfg.hidden_dim, cfg)
        self.inp = nn.Linear(llm_dim, width)
        self.signal_pos = nn.Parameter(torch.zeros(num_signal, width))
        self.queries = nn.Parameter(torch.randn(out_shape[0], width) * width**-0.5)
        layer = nn.TransformerDecoderLayer(
            width, cfg.num_heads, dim_feedforward=4 * width, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, cfg.num_layers, norm=nn.LayerNorm(width))
        self.out = nn.Linear(width, out_shape[1])

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden``/``embeddings``: (G, k, D_llm) for G signal groups -> (G, L, D_dec)."""
        if hidden.shape[1] != self.num_signal:
            raise ValueError(f"output projection expects {self.num_signal} signal tokens, got {hidden.shape[1]}")
        x = hidden + embeddings if (self.use_token_embeddings and embeddings is not None) else hidden
        memory = self.inp(x) + self.signal_pos
        queries = self.queries.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return self.out(self.blocks(queries, memory))
