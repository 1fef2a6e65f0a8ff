"""A byte-level tokenizer that needs no files or downloads, for the embedded demo model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

__all__ = ["ByteTokenizer"]

TOKENIZER_FILE = "qlora_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, plus ``<bos>``, ``<eos>`` and ``<pad>``.

    Any text round-trips exactly, and the vocabulary is tiny (259 ids), which keeps the embedded model small.
    It answers the few calls the fine-tuning loop makes of a Hugging Face tokenizer: ``encode``, ``decode``,
    ``eos_token_id``, ``bos_token_id``, ``pad_token_id`` and ``save_pretrained``.
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` prepends ``<bos>``."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped (or shown as ``<bos>``... when not skipped)."""
        names = {self.bos_token_id: "<bos>", self.eos_token_id: "<eos>", self.pad_token_id: "<pad>"}
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, f"<{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write a marker file so :func:`load_tokenizer` finds this tokenizer again."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size}))


def load_tokenizer(directory: Union[str, Path]):
    """The tokenizer saved in a model directory: qlora's byte tokenizer if its marker file is there, else
    ``transformers.AutoTokenizer`` (local files only)."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).exists():
        return ByteTokenizer()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"model directory {str(directory)!r} has no tokenizer that loads offline "
                         f"({type(exc).__name__}: {exc})") from exc
