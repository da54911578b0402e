"""What the scripts under ``scripts/`` share: running under ``.venv``, and ``--help`` with defaults.

Imported by a script run as ``python3 scripts/X.py`` (its folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import importlib.util

from bootstrap import reexec_in_venv


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its usage lines kept), and each flag's default after its help.

    Unlike ``ArgumentDefaultsHelpFormatter`` it says nothing for a switch, a default of None
    (an unset option) or a help text that already names its default, where "(default: None)"
    would only be noise.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shows_default = "%(default)" in text or "(default" in text
        if (action.option_strings and action.nargs != 0 and action.default is not None
                and action.default != argparse.SUPPRESS and not shows_default):
            text += " (default: %(default)s)"
        return text


def use_venv(*modules: str, extras: str = "") -> None:
    """Continue under ``.venv``'s python (created on first use, with ``extras``) when this python
    cannot import the project or one of ``modules``, as a system python3 cannot; a python that
    has them all (``.venv``, a virtualenv or container of one's own) goes on as it is."""
    if all(importlib.util.find_spec(name) is not None for name in ("federated_learning", *modules)):
        return
    reexec_in_venv(extras)
