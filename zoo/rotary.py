"""Rotary position embeddings (RoPE), shared by LLaMA and GPT-NeoX.

A head vector is cut into pairs of dimensions and pair i is rotated by the angle
`position * inv_freq[i]`. Two pairings are in use:

- interleaved, (0, 1), (2, 3), ... : Meta's LLaMA (written there with complex numbers);
- half-split, (i, i + d/2)         : GPT-NeoX and Hugging Face's `rotate_half`.

Hugging Face's LLaMA checkpoints are Meta's with the rows of wq/wk permuted so that the
half-split pairing gives the same result; zoo undoes that permutation when loading, so
LLaMA always runs interleaved. The rotation is computed in fp32 (as Meta does) and cast back.
"""
import math

import torch

from zoo.kernels import native

ROPE_TYPES = ("default", "linear", "llama3")


def inv_frequencies(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """1 / theta^(2i / rotary_dim) for i < rotary_dim/2, rescaled as `scaling` asks. fp32, on the CPU."""
    freqs = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device="cpu")[: rotary_dim // 2].float() / rotary_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return freqs
    if kind == "linear":  # position interpolation: every angle divided by `factor`
        return freqs / scaling["factor"]
    if kind == "llama3":  # LLaMA 3.1: slow the low frequencies down, keep the high ones, blend in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        freqs_out = torch.where(wavelen > old_len / low, freqs / factor, blended)
        return torch.where(wavelen < old_len / high, freqs, freqs_out)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")


def rope_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, shaped (batch or 1, seq, 1, rotary_dim/2) to broadcast over heads."""
    angles = positions[..., None].float() * inv_freq  # (batch or 1, seq, rotary_dim/2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of every head of x: (batch, seq, heads, head_dim).

    On the CPU, outside autograd and compiling, native.cpp's `rotary` does the same operations in one pass
    (the same bits: tests/test_native.py), where its kernels are built."""
    if (x.device.type == "cpu" and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32)
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)
            and native.load() is not None):
        return torch.ops.zoo_native.rotary(x, cos.contiguous(), sin.contiguous(), interleaved)
    return rotated(x, cos, sin, interleaved)


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """apply_rotary in PyTorch operators (the definition; any device, autograd, compiling)."""
    rot = 2 * cos.shape[-1]
    xf = x[..., :rot].float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = out.type_as(x)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)  # partial rotary (GPT-NeoX rotary_pct < 1)
