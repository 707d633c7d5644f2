"""Research instruments on the hook points: activation patching sweeps (sweep.py) and attribution patching
(attribution.py; gradients at hook points are zoo.hooks.collect(grads=True)), the logit lens, the residual
stream decomposed and direct logit attribution (lens.py), pictures of them in one self-contained HTML page
(show.py)."""
from zoo.analysis.attribution import attribute
from zoo.analysis.lens import Attribution, Decomposition, Lens, decompose, logit_attribution, logit_lens
from zoo.analysis.show import save_html, show
from zoo.analysis.sweep import patch_sweep

__all__ = ["logit_lens", "decompose", "logit_attribution", "Lens", "Decomposition", "Attribution", "show", "save_html",
           "attribute", "patch_sweep"]
