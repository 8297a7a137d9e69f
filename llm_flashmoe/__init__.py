"""llm-flashmoe: Qwen3.5 MoE models in `llm`, experts streamed from SSD.

Importing this package must stay cheap: mlx and tokenizers are imported only
where a model actually runs, so that `llm --help` stays fast.
"""

from .errors import FlashMoeError

__all__ = ["FlashMoeError"]
__version__ = "0.1.0"
