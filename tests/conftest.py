import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    assert (TINY / "params.json").exists(), f"the bundled checkpoint {TINY} is missing"
    return TINY
