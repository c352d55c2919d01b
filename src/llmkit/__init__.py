"""llmkit: every idea of the modern language-model stack as a real, tested, composable PyTorch part."""
from llmkit.config import PRESETS, ModelConfig
from llmkit.errors import UserError
import llmkit.accel  # noqa: F401,E402  (fills the fast-path seams; see llmkit/accel/__init__.py)
import llmkit.interop  # noqa: F401,E402  (registers pretrained readers and peft adapter naming: interop.register)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "UserError", "load", "DecoderLM", "TrainConfig", "train", "generate", "embed"]


def __getattr__(name: str):
    """Import heavy parts (torch models, training) only when used, so `llmkit --help` stays fast."""
    if name == "load":
        from llmkit.api import load
        return load
    if name == "embed":
        from llmkit.api import embed
        return embed
    if name == "DecoderLM":
        from llmkit.models.decoder import DecoderLM
        return DecoderLM
    if name == "TrainConfig":
        from llmkit.training.config import TrainConfig
        return TrainConfig
    if name == "train":
        from llmkit.training.loop import train
        return train
    if name == "generate":
        from llmkit.generation.generate import generate
        return generate
    raise AttributeError(name)
