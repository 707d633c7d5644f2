"""torch.compile for generation: the prefill and a static-shape decode step, CUDA graphs on GPUs.

    model = zoo.compile(zoo.load("tiny-llama"))       # run.py --compile
    zoo.generate(model, prompts, max_new_tokens=64)   # the prefill and every decode step run compiled

The decode step sees the same shapes at every step: the KV cache is static (KVCache(static=True):
written at a slot tensor, read whole with a mask; attention.py), so it compiles once per batch
size and cache size, not once per position. The cache size is rounded up to a multiple of
CACHE_STEP positions so that generations of different lengths share the compiled step. The
prefill's sequence length is marked dynamic: one graph for every prompt length.

On CUDA the decode step also runs as a CUDA graph (inductor's "triton.cudagraphs"): one launch per
step instead of one per kernel. On the CPU, in bf16 and fp16, inductor freezes the weights into the
decode step's graph ("freezing": constant folding, oneDNN's prepacked linear for the matmuls, and
the linears that read one input, such as q, k and v, concatenated into one); fp32 keeps torch's
GEMMs, so its logits stay within 1e-5 of eager's. The decode step's attention (one query per row)
is written out (attention_with_pattern, zoo/kernels/attention.py), which inductor fuses into a few
loops: on the CPU faster than SDPA's kernel for one query. `max_autotune=True` also tries inductor's own C++ GEMM
templates, which pays for matrix-vector products at batch 1 but compiles for minutes on a small
machine.

Memory: a frozen graph holds its own prepacked copy of the weights, beside the model's (which the
prefill, hooks and anything eager still use). On the CPU in bf16 a compiled model therefore needs
twice the weights' memory, and one more copy for each further batch size it decodes (each is its
own graph). The prefill is not frozen: that would be one more copy.

What does not compile, or does not gain, runs eagerly, and says so once on stderr: a quantized model
on a CPU without zoo's native kernels (torch's int8 operator does not lower in torch 2.13), hooks
(Python functions called per point; a generation with hooks uses the eager model and a plain cache),
tensor parallelism (gloo's collectives are not traceable), and whatever inductor fails to compile.
With the native kernels a quantized model compiles: they are opaque operators in the graph, and the
rest is fused around them (the README's Benchmarks have the figures).
Compiled code is cached by inductor on disk (its FX graph cache, under $TORCHINDUCTOR_CACHE_DIR or
/tmp/torchinductor_$USER), so a second process compiles faster.
"""
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from zoo import parallel
from zoo.forward import call_compiled
from zoo.kernels import native
from zoo.quant import QuantLinear

CACHE_STEP = 256  # compiled caches hold a multiple of this many positions (at most the model's context)
MODES = ("default", "max-autotune")


@dataclass
class Compiled:
    """The compiled callables of a model: each takes the model's forward arguments."""
    prefill: Callable
    decode: Callable

    def cache_len(self, needed: int, context: int) -> int:
        """The static cache's size for a generation that needs `needed` positions."""
        return min(context, CACHE_STEP * math.ceil(needed / CACHE_STEP))


def compile(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile `model`'s prefill and decode step for zoo.generate / stream / steps; returns the model.

    mode "default": inductor (CUDA graphs for the decode step on a GPU, frozen weights on the CPU);
    "max-autotune": also let inductor search its GEMM templates (slow to compile). Nothing runs
    until the first generation, which then compiles (seconds to minutes; cached on disk).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not accepted: one of {', '.join(MODES)}")
    if parallel.world_size() > 1:
        _say_once(model, "zoo.compile: tensor parallelism runs eagerly (its collectives do not compile)")
        return model
    device = next(model.parameters()).device
    if device.type == "cpu" and native.load() is None and any(isinstance(m, QuantLinear) for m in model.modules()):
        _say_once(model, "zoo.compile: a quantized model on this CPU runs eagerly (without zoo's native kernels "
                         "its layers take torch's quantized operators, which inductor cannot lower)")
        return model
    options = {"max_autotune": mode == "max-autotune"}
    decode_options = {**options, "triton.cudagraphs": device.type == "cuda"}
    if device.type == "cpu" and model.embed.weight.dtype != torch.float32:  # fp32 keeps eager's GEMMs: its logits
        decode_options["freezing"] = True                                     # then stay within 1e-5 of eager's
        decode_options["cpp.enable_concat_linear"] = True  # q, k, v (and gate, up) from one input: one matmul
    prefill = torch.compile(model.forward, options=options)

    def prefill_any_length(tokens, **kwargs):  # one graph for every prompt length from 2 (1 is the decode step)
        if tokens.shape[1] > 1:  # "maybe": code that needs a bound (int8's rows) may still narrow it
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
        return prefill(tokens, **kwargs)

    model.compiled = Compiled(prefill=_or_eager(model, prefill_any_length, "prefill", options),
                              decode=_or_eager(model, torch.compile(model.forward, dynamic=False, options=decode_options),
                                               "decode step", decode_options))
    return model


def _or_eager(model: nn.Module, compiled: Callable, what: str, options: dict) -> Callable:
    """compiled, until inductor fails to compile it (e.g. an operator it cannot lower): then the eager forward,
    said once. A failed compile runs nothing, so the call is simply made again eagerly."""
    failed = []

    def call(tokens, cache, **kwargs):
        if not failed:
            try:
                # dynamo reads `freezing` while tracing, before torch.compile's options apply: patched here too
                with torch._inductor.config.patch(freezing=options.get("freezing", False)):
                    return call_compiled(model, compiled, tokens, cache, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                failed.append(e)
                reason = str(e).strip().splitlines()[0][:160]
                _say_once(model, f"zoo.compile: the {what} does not compile here ({reason}); it runs eagerly")
        return model(tokens, cache=cache, **kwargs)
    return call


def compiled_for(model: nn.Module, hooks) -> Compiled | None:
    """The compiled callables a generation uses, or None to run eagerly (an uncompiled model, or hooks: said once)."""
    compiled = getattr(model, "compiled", None)
    if compiled is not None and hooks is not None:
        _say_once(model, "zoo.compile: a generation with hooks runs eagerly (hooks call Python at every point)")
        return None
    return compiled


def _say_once(model: nn.Module, message: str) -> None:
    said = model.__dict__.setdefault("_compile_notes", set())
    if message not in said and parallel.rank() == 0:
        print(message, file=sys.stderr)
    said.add(message)
