"""How the CLI shows errors: messages are printed as text, never as rich markup.

fedistill's messages name config fields the TOML way (``[data] label``), which rich would take for
markup tags and silently drop.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

# Soft wrap: an error names paths and hashes, which must stay whole when copied from a log.
err_console = Console(stderr=True, soft_wrap=True)


def print_error(err: Exception | str, heading: str = "error") -> None:
    err_console.print(f"[red]{heading}:[/red] {escape(str(err))}", highlight=False)
