"""Attribution patching: the linear estimate of every activation patch at once, from one clean forward and
one corrupted forward and backward.

    est = attribute(model, clean, corrupted, metric, points=("resid_pre", "attn_out", "z", "mlp_post"))
    est["resid_pre"]   # (layers, seq): metric change estimated for patching resid_pre at (layer, position)
    est["z"]           # (layers, seq, heads): one head at one position; .sum(1) for a head at every position
    est["mlp_post"]    # (layers, seq, F): one neuron at one position

Patching the clean activation a into the corrupted run, where it was a', changes the metric by about
(a - a') . d(metric)/d(a') (the gradient in the corrupted run): a first-order Taylor estimate of what
zoo.analysis.patch_sweep computes exactly, summed over the batch and over the dims a unit owns (a
residual vector's D, a head's d). Same arguments as patch_sweep; under tensor parallelism every rank
returns the full tensors. It is exact for a metric linear in the activation and drifts where the patch
moves the activation far through nonlinearities (the README's Research section has how far, on the
bundled model).
"""
import torch

from zoo import hooks
from zoo.analysis.sweep import check_pair
from zoo.hooks.points import HEAD_POINTS, LAYER_POINTS, NEURON_POINTS

DEFAULT_POINTS = ("resid_pre", "attn_out", "mlp_out", "z", "mlp_post")


def attribute(model, clean: torch.Tensor, corrupted: torch.Tensor, metric, points=DEFAULT_POINTS) -> dict:
    """point -> the estimated change of the metric per (layer, position[, unit]), float32 (module docstring)."""
    check_pair(model, clean, corrupted)
    points = [points] if isinstance(points, str) else list(points)
    for p in points:
        if p not in LAYER_POINTS:
            raise ValueError(f"points: {p!r} is not a point of every block; choose from {', '.join(LAYER_POINTS)}")
    names = [f"blocks.*.{p}" for p in points]
    with torch.no_grad():
        clean_acts = hooks.collect(*names, gather=True)
        model(clean, hooks=clean_acts, last_only=True)  # block points only: the clean logits are not needed
    corrupted_acts = hooks.collect(*names, gather=True, grads=True)
    with torch.enable_grad():
        metric(model(corrupted, hooks=corrupted_acts)).backward()
    out = {}
    for p in points:
        layers = [i for i in range(len(model.blocks)) if f"blocks.{i}.{p}" in corrupted_acts]
        out[p] = torch.stack([per_unit(p, (clean_acts[n] - corrupted_acts[n]) * corrupted_acts.grads[n])
                              for n in (f"blocks.{i}.{p}" for i in layers)]).float().cpu()
    return out


def per_unit(point: str, terms: torch.Tensor) -> torch.Tensor:
    """(clean - corrupted) * grad at one point -> summed over the batch and each unit's own dims: (seq,) for a
    vector of the residual width, (seq, heads) for head points, (seq, F) for neuron points."""
    if point == "pattern":  # (b, h, q, k): a head's pattern row at query q
        return terms.sum(dim=(0, 3)).T
    if point in HEAD_POINTS:  # (b, s, h, d)
        return terms.sum(dim=(0, 3))
    if point in NEURON_POINTS:  # (b, s, F)
        return terms.sum(dim=0)
    return terms.sum(dim=(0, 2))  # (b, s, D)
