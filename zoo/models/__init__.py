"""One file per model family, each readable top to bottom: llama.py (LLaMA 1, 2, 3), opt.py (OPT),
gpt_neox.py (GPT-NeoX, Pythia)."""
