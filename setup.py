from setuptools import find_packages, setup

setup(
    name="zoo",
    version="0.1.0",
    description="Readable LLaMA, OPT and GPT-NeoX with tensor parallelism, hooks and weight-only quantization",
    packages=find_packages(include=["zoo", "zoo.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<2.15", "sentencepiece", "tiktoken", "safetensors", "numpy"],
    extras_require={"test": ["pytest", "transformers>=4.45", "psutil"]},
)
