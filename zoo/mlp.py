"""The feed-forward layers, one idea in two forms: the two-layer MLP of OPT and GPT-NeoX,
w_out(act(w_in x)), and LLaMA's gated one (SwiGLU), w_out(act(w_gate x) * w_in x).

The hidden units ("neurons", the hook point mlp_post) are the input of w_out. Under tensor parallelism
w_in (and w_gate) are column-parallel and w_out row-parallel: each rank computes a slice of the hidden
units, and the partial outputs are summed.
"""
from typing import Callable

import torch
from torch import nn

from zoo.parallel import column_parallel_linear, row_parallel_linear

Activation = Callable[[torch.Tensor], torch.Tensor]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, activation: Activation, layer: int = 0, bias: bool = True):
        super().__init__()
        self.w_in = column_parallel_linear(dim, hidden_dim, bias=bias, gather_output=False)
        self.w_out = row_parallel_linear(hidden_dim, dim, bias=bias, input_is_parallel=True)
        self.activation, self.layer = activation, layer

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        pre = step.hook(self.layer, "mlp_pre", self.w_in(x))  # (batch, seq, hidden_dim), this rank's slice under TP
        neurons = step.hook(self.layer, "mlp_post", self.activation(pre))
        return self.w_out(neurons)  # (batch, seq, dim)


class GatedMLP(nn.Module):
    """Meta calls the three weights w1 (gate), w3 (in), w2 (out)."""

    def __init__(self, dim: int, hidden_dim: int, activation: Activation, layer: int = 0, bias: bool = False):
        super().__init__()
        self.w_gate = column_parallel_linear(dim, hidden_dim, bias=bias, gather_output=False)
        self.w_in = column_parallel_linear(dim, hidden_dim, bias=bias, gather_output=False)
        self.w_out = row_parallel_linear(hidden_dim, dim, bias=bias, input_is_parallel=True)
        self.activation, self.layer = activation, layer

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        gate = step.hook(self.layer, "mlp_pre", self.w_gate(x))  # (batch, seq, hidden_dim), this rank's slice
        neurons = step.hook(self.layer, "mlp_post", self.activation(gate) * self.w_in(x))
        return self.w_out(neurons)  # (batch, seq, dim)
