"""RMSNorm, shared by the LLaMA family (OPT and GPT-NeoX use torch's own LayerNorm)."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics taken in fp32.

    The result is cast back to the input dtype *before* the multiply by `weight`,
    exactly as Meta's and Hugging Face's LLaMA do, so bf16 results match theirs bit for bit.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
