"""The account password a command uses (``--password-file``, ``--password``, the default), for ``vspemu serve``
and ``vspemu up`` alike (kept apart from :mod:`vspemu.cli.main` so that :mod:`vspemu.cli.lab` needs no import
of the command it is part of)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from vspemu.system.storage import DEFAULT_PASSWORD


def _account_password(password: str | None, password_file: Path | None) -> str:
    """--password-file, else --password / $VSPEMU_PASSWORD, else the default account password."""
    if password_file is None:
        return DEFAULT_PASSWORD if password is None else password
    try:
        lines = password_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"--password-file {password_file}: {e}") from None
    if not lines or not lines[0]:
        raise typer.BadParameter(f"--password-file {password_file}: the first line is empty")
    if password_file.stat().st_mode & 0o077:
        logging.getLogger("vspemu").warning("the password file %s is readable by other users", password_file)
    return lines[0]
