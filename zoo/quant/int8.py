"""int8: symmetric, one scale per output channel, w[n, k] = q[n, k] * scale[n] with q in -127..127 (the
format: zoo/kernels/reference.py). Takes a layer of any width; no groups, no options."""
import torch

from zoo.kernels import Int8Weight, dequantize_int8
from zoo.quant.scheme import Scheme, by_rows


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w [N, K] -> int8 [N, K] and fp32 scales [N]: each row scaled so that its largest |w| maps to 127."""
    return Int8Weight(*by_rows(w, _int8_rows))


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8(Scheme):
    name = "int8"
    weight = Int8Weight
    tensors = {"qweight": (0, 1), "scales": (0, None)}  # a row split cuts the inputs; the per-row scales stay whole
    layout = "L.qweight int8 [N, K], L.scales fp32 [N]: w = qweight * scales[:, None]"

    def quantize(self, w, group_size=128, symmetric=False, refine=False) -> Int8Weight:
        return quantize_int8(w)

    def weight_bytes(self, n, k, group_size) -> int:
        return n * k + 4 * n  # a byte per weight, an fp32 scale per row

    def dequantize(self, weight: Int8Weight) -> torch.Tensor:
        return dequantize_int8(weight.qweight, weight.scales)


SCHEME = Int8()
