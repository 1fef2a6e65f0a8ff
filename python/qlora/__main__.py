"""The ``qlora`` command: ``qlora finetune ...`` (also ``python -m qlora finetune ...``)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {"finetune": "QLoRA fine-tuning of a causal LM (qlora finetune --help)"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qlora <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:10} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"qlora: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from . import finetune
    return finetune.main(rest)


if __name__ == "__main__":
    sys.exit(main())
