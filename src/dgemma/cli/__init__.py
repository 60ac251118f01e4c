"""The `dgemma` command line: `dgemma generate`, `dgemma chat`, `dgemma info`, `dgemma train`,
`dgemma tokenizer train`, `dgemma serve`, `dgemma batch`, `dgemma eval`, `dgemma bench`.

    dgemma generate "Write a haiku about the sea" --model path/to/checkpoint --chat
    echo "Once upon a time" | dgemma generate --model tiny --max-new-tokens 64 --show-canvas
    dgemma info 26b-a4b --json

One module per subcommand (`add_parser` and its `cmd_*`), the helpers they share in `common`, and `main`,
which builds the parser and turns errors into one line and an exit status.
"""

from .common import CLIError
from .main import build_parser, entry, main

__all__ = ["CLIError", "build_parser", "entry", "main"]
