"""The two-layer feed-forward of OPT and GPT-NeoX: w_out(act(w_in x)), with biases.

(LLaMA's gated SwiGLU lives in zoo/models/llama.py.) Under tensor parallelism w_in is
column-parallel and w_out row-parallel: each rank computes a slice of the hidden units.
"""
from typing import Callable

import torch
from torch import nn

from zoo.parallel import column_parallel_linear, row_parallel_linear


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, activation: Callable[[torch.Tensor], torch.Tensor], bias: bool = True):
        super().__init__()
        self.w_in = column_parallel_linear(dim, hidden_dim, bias=bias, gather_output=False)
        self.w_out = row_parallel_linear(hidden_dim, dim, bias=bias, input_is_parallel=True)
        self.activation = activation

    def forward(self, x: torch.Tensor, hooks=None, layer: int = 0) -> torch.Tensor:
        pre = self.w_in(x)  # (batch, seq, hidden_dim), this rank's slice under TP
        if hooks:
            pre = hooks(layer, "mlp_pre", pre)
        neurons = self.activation(pre)
        if hooks:
            neurons = hooks(layer, "mlp_post", neurons)
        return self.w_out(neurons)  # (batch, seq, dim)
