"""How the CLI writes: errors as text, never as rich markup, and colour only on a terminal.

fedistill's messages name config fields the TOML way (``[data] label``), which rich would take for
markup tags and silently drop. Output also lands in logs and in files other programs read: there it is
plain text, whatever FORCE_COLOR or TTY_COMPATIBLE say, and every error ends with a newline.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape


def make_console(stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A rich console that writes escape codes only to a terminal (rich alone obeys FORCE_COLOR on a pipe too).

    ``soft_wrap`` for messages that name paths and hashes, which must stay whole when copied from a log.
    """
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=soft_wrap, force_terminal=None if stream.isatty() else False)


def print_error(err: Exception | str, heading: str = "error") -> None:
    """``heading: message`` on stderr, the heading red on a terminal."""
    message = str(err).rstrip("\n")
    if sys.stderr.isatty():
        terminal = make_console(stderr=True, soft_wrap=True)
        terminal.print(f"[red]{escape(heading)}:[/red] {escape(message)}", highlight=False)
    else:
        sys.stderr.write(f"{heading}: {message}\n")
        sys.stderr.flush()
