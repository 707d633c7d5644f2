"""One file per model family, each readable top to bottom: llama.py (LLaMA 1, 2, 3), opt.py (OPT),
gpt_neox.py (GPT-NeoX, Pythia): config, modules, forward, and the family's Hugging Face names."""
from typing import Callable, NamedTuple

from zoo.models import gpt_neox, llama, opt


class Family(NamedTuple):
    config: type
    model: type  # model(config, tokenizer=None)
    hf_to_zoo: Callable  # Hugging Face key -> our parameter names ([]: skip the key; several: a fused tensor)
    zoo_to_hf: Callable  # the other way, to name a missing tensor in the checkpoint's words
    hf_tensor_to_zoo: Callable  # (name, tensor or a slice of whole heads of it, cfg) -> the tensor in our layout


FAMILIES = {  # config.json's model_type -> family
    "llama": Family(llama.LlamaConfig, llama.Llama, llama.hf_to_zoo, llama.zoo_to_hf, llama.hf_tensor_to_zoo),
    "opt": Family(opt.OPTConfig, opt.OPT, opt.hf_to_zoo, opt.zoo_to_hf, opt.hf_tensor_to_zoo),
    "gpt_neox": Family(gpt_neox.GPTNeoXConfig, gpt_neox.GPTNeoX, gpt_neox.hf_to_zoo, gpt_neox.zoo_to_hf,
                       gpt_neox.hf_tensor_to_zoo),
}
