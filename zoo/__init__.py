"""zoo: readable LLaMA, OPT and GPT-NeoX with tensor parallelism, hooks and weight-only quantization.

    import zoo
    model = zoo.load("tiny-llama", dtype=torch.float32)
    ids = model.tokenizer.encode("The for statement", bos=True)
    new = zoo.generate(model, [ids], max_new_tokens=32)[0]
    print(model.tokenizer.decode(new))
"""
from zoo import hooks
from zoo.formats.files import CheckpointError
from zoo.chat import Chat, chat
from zoo.compile import compile
from zoo.generate import generate, steps, stream
from zoo.loader import find_checkpoint, load
from zoo.save import save
from zoo.weights import weights

__all__ = ["load", "save", "generate", "stream", "steps", "chat", "Chat", "compile", "find_checkpoint", "CheckpointError",
           "hooks", "weights"]
__version__ = "0.1.0"
