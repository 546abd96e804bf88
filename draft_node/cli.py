"""`draft-node`: serve a small model that proposes tokens."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tandem.wire.node_cli import main as node_main

DEFAULT_PORT = 50052


def main(argv: Sequence[str] | None = None) -> int:
    return node_main("draft", DEFAULT_PORT, "draft_node.service:DraftService", argv)


if __name__ == "__main__":
    sys.exit(main())
