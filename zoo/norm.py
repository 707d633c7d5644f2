"""RMSNorm, shared by the LLaMA family and Gemma (OPT and GPT-NeoX use torch's own LayerNorm)."""
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
        return self.normalized(x).type_as(x) * self.weight

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps), in fp32."""
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + weight), all in fp32, cast back only at the end.

    The weight is stored as checkpoints hold it (0 is the identity). Unlike LLaMA's, the (1 + weight)
    multiply comes before the cast, as Hugging Face's Gemma does.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalized(x) * (1.0 + self.weight.float())).type_as(x)
