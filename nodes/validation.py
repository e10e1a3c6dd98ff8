"""Checks shared by the nodes: file names from ComfyUI's folder lists, pack-internal sockets.

A file input only ever carries a name that ComfyUI listed for its folder; it is resolved to a path
at execution through folder_paths. Anything else (an absolute path, `../`, a FIFO that is not a
regular file, a name from another folder) is refused without opening anything and with the same
message whether or not such a path exists, so errors cannot be used to probe the server's disk.
"""
from __future__ import annotations

import math

# ComfyUI sends long lists back to the browser; a refused name is echoed in short form only.
_ECHO = 80


def _echo(value) -> str:
    text = repr(value)
    return text if len(text) <= _ECHO else text[:_ECHO] + "...'"


def not_listed(name, choices: list[str], where: str, label: str) -> str | None:
    """The refusal message when `name` is not one of `choices` (None when it is)."""
    if isinstance(name, str) and name in choices:
        return None
    return f"{label} {_echo(name)} is not a file in {where}"


def resolve(folder: str, name, label: str, where: str | None = None) -> str:
    """Execution-time resolution of a listed name in a ComfyUI model folder -> its path."""
    import folder_paths

    where = where or f"models/{folder}"
    problem = not_listed(name, folder_paths.get_filename_list(folder), where, label)
    path = None if problem else folder_paths.get_full_path(folder, name)
    if problem or path is None:
        raise ValueError(problem or f"{label} {_echo(name)} is not a file in {where}")
    return path


def lora_chain(value, label: str = "lora") -> list[tuple[str, float]]:
    """A WANVIDLORA value -> checked [(name listed in models/loras, finite strength)]."""
    import folder_paths

    try:
        pairs = [(name, float(strength)) for name, strength in (value or [])]
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected the output of WanVideo LoRA Select (a list of "
                         f"(file, strength)), got {type(value).__name__}") from None
    listed = folder_paths.get_filename_list("loras")
    for name, strength in pairs:
        problem = not_listed(name, listed, "models/loras", f"{label}: LoRA")
        if problem:
            raise ValueError(problem)
        if not math.isfinite(strength):
            raise ValueError(f"{label}: LoRA {name!r} has strength {strength}; a finite number "
                             "is needed")
    return pairs

