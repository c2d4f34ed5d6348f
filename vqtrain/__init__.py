"""vqtrain: train discrete autoencoders (VQ, SimVQ, FSQ, residual) and use them as tokenizers.

`import vqtrain` stays cheap: `load_tokenizer` pulls in torch and Lightning on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "load_tokenizer":
        from vqtrain.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'vqtrain' has no attribute {name!r}")
