"""Hook points: read, record, replace, add to or ablate any activation, passed to the forward.

    logits = model(tokens, hooks={"blocks.3.resid_post": fn, "blocks.*.z": zoo.hooks.ablate(heads=[5])})
    def fn(x, ctx): ...      # return a tensor to replace x, or None to only read it
    cache = zoo.hooks.collect("blocks.*.resid_post", "blocks.2.pattern")
    model(tokens, hooks=cache); cache["blocks.2.pattern"]     # (batch, heads, q, k)

The same names on every family (see POINTS and the README's table), and a few that only some
families have (FAMILY_POINTS: Qwen3's q_normed and k_normed, Gemma 2's attn_out_normed and
mlp_out_normed; a block lists its own in `extra_points`). Names may be globs and are
expanded once per forward; an unknown name is an error that lists the nearest valid ones. Several
hooks on one point run in the order given (a list of hook sets is read left to right). With no
hooks the models pay one call of a no-op function per point (zoo/forward.py's Step.hook): no modules,
no dictionaries.

The contract:
- Positions are positions in each row's own tokens, 0 = its first real token, in every forward
  (prefill or decode, left-padded or not, in one process or under tensor parallelism).
  `ctx.positions` (batch or 1, seq) gives them along x's sequence dim; left padding is negative
  there and no built-in acts on it. Negative positions are refused: during generation the end of
  a sequence moves, so "from the end" would mean a different token at every step.
- A generation is a forward, step by step: over a generation every point (ln_final and logits
  included) sees exactly the positions and values one forward of the final sequence shows.
- Heads and neurons are indexed over the whole model, in one process and under tensor
  parallelism alike; negative ones count from the end as in Python; out of range is an error.
- A hook returns None or a floating-point tensor of x's shape on x's device; it is cast to x's dtype.
- A run is one forward without a KV cache, or every forward on one KV cache (a generation).
  `collect` holds one run: the first forward of a new run replaces what it held.

Under tensor parallelism q, k, v, pattern and z hold this rank's heads and mlp_pre/mlp_post its
hidden units: `ctx.shard` says which slice of the full tensor `x` is, `ctx.gather(x)` returns the
full tensor. The built-in hooks take global head and neuron indices, and full-width values,
and handle the slices.
"""
from zoo.hooks.builtins import ablate, add, collect, patch, replace
from zoo.hooks.points import HEAD_POINTS, LAYER_POINTS, NEURON_POINTS, POINTS, Context, Hooks, hook_points, names, resolve

__all__ = ["POINTS", "LAYER_POINTS", "HEAD_POINTS", "NEURON_POINTS", "Context", "Hooks", "names", "resolve",
           "hook_points", "replace", "add", "ablate", "collect", "patch"]
