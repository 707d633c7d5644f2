"""Weight-only quantization of the linear layers, for smaller and faster decoding: one scheme per file.

    model = zoo.load("tiny-llama", quant="int8")                  # quantized layer by layer while loading
    model = zoo.load("tiny-llama", quant="int4", group_size=64)
    zoo.quant.quantize(model, "int4", group_size=128)              # or afterwards
    zoo.load("tiny-llama", quant="int4", refine=True)              # slower; less error (refine_int4)

Schemes (SCHEMES below; zoo/kernels/reference.py holds the exact formats):
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

    scheme.py       what a scheme is (Scheme): its quantizer, stored tensors and their splits, layout,
                    bytes, which layers it fits, its matmul and its dequantization
    int8.py         the int8 scheme (quantize_int8)
    int4.py         the int4 scheme (quantize_int4, min/max or refined, and its group sizes)
    linear.py       QuantLinear, in place of nn.Linear or a tensor-parallel linear layer
    surgery.py      which layers (`plan`), and swapping them in (`quantize`, `quantize_linear`, `place_layers`)
    save.py         writing a quantized checkpoint (`save`), never where it could lose data (`check_output`)

A new scheme is its own file plus one line in SCHEMES: nothing else in zoo names a scheme.
"""
from zoo.kernels import INT4_GROUP_SIZES, Int4Weight, Int8Weight
from zoo.quant import int4, int8
from zoo.quant.scheme import Scheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (int8.SCHEME, int4.SCHEME)}  # defined before surgery, which reads it


def scheme_named(name: str) -> Scheme:
    """The registered scheme called `name` ("int8"), or a ValueError listing them."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


from zoo.formats.quantized import FORMAT, VERSION  # noqa: E402
from zoo.quant.int4 import quantize_int4, refine_int4  # noqa: E402
from zoo.quant.int8 import quantize_int8  # noqa: E402
from zoo.quant.linear import QuantLinear  # noqa: E402
from zoo.quant.save import check_output, save  # noqa: E402
from zoo.quant.surgery import (LINEARS, candidate_layers, describe_layers, layer_paths, misfits, place_layers,  # noqa: E402
                               plan, quantize, quantize_linear, replace_module)

__all__ = ["SCHEMES", "Scheme", "scheme_named", "FORMAT", "VERSION", "INT4_GROUP_SIZES", "Int8Weight", "Int4Weight",
           "QuantLinear", "LINEARS", "quantize_int8", "quantize_int4", "refine_int4", "quantize_linear",
           "replace_module", "candidate_layers", "misfits", "plan", "describe_layers", "quantize", "place_layers",
           "check_output", "save", "layer_paths"]
