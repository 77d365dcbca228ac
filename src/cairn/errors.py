"""User-facing errors.

A ``CairnError`` is a problem the user can fix: its message names the thing at fault and the fix. The CLI prints
it as ``error: ...`` and exits with status 2; the server answers it in the API's own error shape.
"""

from __future__ import annotations


class CairnError(Exception):
    """An error caused by input the user controls (a path, a file, a flag, a request field)."""
