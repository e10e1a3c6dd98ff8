"""Model folders the pack registers with ComfyUI and file look-ups across them.

Registration happens when a node schema is defined or a node runs (never at import time):
models/infinitetalk (InfiniteTalk patches) and models/wav2vec2 (speech encoders).
"""
from __future__ import annotations

import os

from .validation import not_listed

INFINITETALK = "infinitetalk"
WAV2VEC2 = "wav2vec2"
EXTENSIONS = (".safetensors",)


def register_folder(name: str, extensions=EXTENSIONS) -> None:
    """models/<name> as a ComfyUI model folder (idempotent)."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, name)
    folder_paths.add_model_folder_path(name, path)
    folder_paths.folder_names_and_paths[name][1].update(extensions)


def register_folders() -> None:
    register_folder(INFINITETALK)
    register_folder(WAV2VEC2)


def _files(folder: str) -> list[str]:
    import folder_paths

    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def patch_files() -> list[str]:
    """InfiniteTalk patch choices: models/infinitetalk first, then models/diffusion_models."""
    register_folder(INFINITETALK)
    own = _files(INFINITETALK)
    return own + [f for f in _files("diffusion_models") if f not in own]


def patch_path(name: str) -> str:
    import folder_paths

    register_folder(INFINITETALK)
    for folder in (INFINITETALK, "diffusion_models"):
        if name in _files(folder):
            path = folder_paths.get_full_path(folder, name)
            if path:
                return path
    raise ValueError(not_listed(name, [], f"models/{INFINITETALK} or models/diffusion_models",
                                "InfiniteTalk patch"))


def wav2vec2_choices() -> list[str]:
    """Sub-folders holding config.json (transformers layout) and single .safetensors files,
    directly inside every registered wav2vec2 folder."""
    import folder_paths

    register_folder(WAV2VEC2)
    out = set()
    for root in folder_paths.get_folder_paths(WAV2VEC2):
        if not os.path.isdir(root):
            continue
        for entry in os.listdir(root):
            full = os.path.join(root, entry)
            if os.path.isdir(full) and os.path.isfile(os.path.join(full, "config.json")):
                out.add(entry)
            elif os.path.isfile(full) and entry.endswith(EXTENSIONS):
                out.add(entry)
    return sorted(out)


def wav2vec2_path(name: str) -> str:
    import folder_paths

    if name in wav2vec2_choices():
        for root in folder_paths.get_folder_paths(WAV2VEC2):
            full = os.path.join(root, name)
            if os.path.isdir(full) or os.path.isfile(full):
                return full
    raise ValueError(not_listed(name, [], f"models/{WAV2VEC2}", "wav2vec2 model"))
