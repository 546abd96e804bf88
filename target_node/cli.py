"""`target-node`: serve the big model that verifies draft blocks."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tandem.wire.node_cli import main as node_main

DEFAULT_PORT = 50051


def main(argv: Sequence[str] | None = None) -> int:
    return node_main("target", DEFAULT_PORT, "target_node.service:TargetService", argv)


if __name__ == "__main__":
    sys.exit(main())
