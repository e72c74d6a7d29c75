"""The torch and transformers releases seqpack supports, checked once at import.

The floors are the oldest releases the whole test suite passes with (docs/getting-started.md, "Supported
versions"); an older one fails in ways far from their cause (a missing FSDP2 method mid-run, a Mamba class built
past seqpack's registration), so
``import seqpack`` stops at once with what to install instead. pyproject.toml states the same floors for pip."""

from __future__ import annotations

FLOORS = {"torch": (2, 9), "transformers": (5, 23)}


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "2.11.0+cu130" -> (2, 11), "5.24.0.dev0" -> (5, 24)."""
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise ImportError naming each package older than its floor and the pip command that fixes it."""
    if installed is None:
        import torch
        import transformers

        installed = {"torch": torch.__version__, "transformers": transformers.__version__}
    too_old = {name: ".".join(map(str, floor)) for name, floor in FLOORS.items() if release(installed[name]) < floor}
    if too_old:
        found = ", ".join(f"{name} {installed[name]} (needs >= {floor})" for name, floor in too_old.items())
        upgrade = " ".join(f"'{name}>={floor}'" for name, floor in too_old.items())
        raise ImportError(f"seqpack needs newer releases: {found}; run: pip install -U {upgrade}")
