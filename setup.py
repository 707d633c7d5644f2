from setuptools import find_packages, setup

setup(
    name="zoo",
    version="0.1.0",
    description="Readable LLaMA, OPT and GPT-NeoX with tensor parallelism, hooks and weight-only quantization",
    packages=find_packages(include=["zoo", "zoo.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<2.15", "sentencepiece", "tiktoken", "tokenizers", "safetensors", "numpy", "pyyaml",
                      "jinja2>=3.1.6",  # chat templates, rendered in its sandbox (older versions have known escapes)
                      "triton>=3.2; platform_system == 'Linux'",  # the CUDA kernels (tested on CPU by its interpreter, 3.9)
                      "ninja"],  # builds zoo/kernels/native.cpp on first use (with the system's g++)
    package_data={"zoo.kernels": ["native.cpp"], "zoo.analysis": ["show.html"]},
    # transformers: numerical reference only (models built from configs, never downloaded), its AutoTokenizer
    # the reference for zoo's tokenizers; fairscale: reference for the tensor-parallel layers
    extras_require={"test": ["pytest", "transformers>=4.45", "fairscale==0.4.13", "psutil", "hypothesis"],
                    # benchmarks/research.py's peers, never imported by zoo
                    "bench": ["transformer-lens>=4,<5", "nnsight>=0.8,<0.9"]},
)
