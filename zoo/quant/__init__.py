"""Weight-only int8 / int4 quantization of the linear layers, for smaller and faster decoding.

    model = zoo.load("tiny-llama", quant="int8")                  # quantized layer by layer while loading
    model = zoo.load("tiny-llama", quant="int4", group_size=64)
    zoo.quant.quantize(model, "int4", group_size=128)              # or afterwards
    zoo.load("tiny-llama", quant="int4", refine=True)              # slower; less error (refine_int4)

Formats (zoo/kernels/reference.py holds the exact definitions):
  int8  symmetric, per output channel: w[n, k] = q[n, k] * scale[n], q in -127..127.
  int4  per group of `group_size` inputs (32, 64, 128 or 256), asymmetric by default:
        w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], q in 0..15, g = k // group_size, with
        scale = (max - min) / 15 and zero = -min / scale over the group (symmetric: zero = 8,
        scale = max|w| / 7). Two q per byte, column 2j in the low nibble.
The linear layers inside the blocks are quantized (attention wq/wk/wv/wo, the MLP's), and the
output layer unless it is tied to the embedding; the embedding, the norms and every bias stay in
floating point. Hooks sit outside the matmuls, so they see the same kind of activations as in the
unquantized model.

Widths. int8 takes a layer of any width. int4 takes a layer whose inputs K split into whole groups
(K % group_size == 0; under tensor parallelism the K of this rank's shard); any other layer stays
in floating point, and loading says which on one line of stderr (`plan`). The same rule holds
when quantizing at load, for `quantize`, in a saved checkpoint (such a layer is stored as
`L.weight`) and when a saved checkpoint is loaded under tensor parallelism (a stored int4 layer
whose groups would straddle two ranks is dequantized to floating point there: the same weights).

Saved checkpoints (save.py writes them, zoo/formats/quantized.py reads them): `zoo.quant.save(model,
"llama-int4")` writes one that `zoo.load("llama-int4")` loads as any other, under tensor parallelism
too; each rank quantizes its own shard as it is read (an int4 group never straddles two ranks: see
Widths).

    quantizers.py   the math: int8 per row, int4 per group (min/max or refined)
    linear.py       QuantLinear, in place of nn.Linear or a tensor-parallel linear layer
    surgery.py      which layers (`plan`), and swapping them in (`quantize`, `quantize_linear`, `place_layers`)
    save.py         writing a quantized checkpoint (`save`), never where it could lose data (`check_output`)
"""
from zoo.formats.quantized import FORMAT, LAYOUTS, VERSION
from zoo.kernels import INT4_GROUP_SIZES, Int4Weight, Int8Weight
from zoo.quant.linear import QuantLinear
from zoo.quant.quantizers import SCHEMES, quantize_int4, quantize_int8, refine_int4
from zoo.quant.save import check_output, save
from zoo.quant.surgery import (LINEARS, candidate_layers, describe_layers, int4_misfit, int4_misfits, place_layers, plan,
                               quantize, quantize_linear, replace_module)

__all__ = ["SCHEMES", "FORMAT", "VERSION", "LAYOUTS", "INT4_GROUP_SIZES", "Int8Weight", "Int4Weight", "QuantLinear",
           "LINEARS", "quantize_int8", "quantize_int4", "refine_int4", "quantize_linear", "replace_module",
           "candidate_layers", "int4_misfit", "int4_misfits", "plan", "describe_layers", "quantize", "place_layers",
           "check_output",
           "save"]
