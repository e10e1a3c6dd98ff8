"""Run a module of this pack as a command line tool (`python -m wanvideo.inspect ...`).

Inside the pack every import is relative, so the pack works under any folder name in
custom_nodes/. A top-level `python -m wanvideo.X` has no parent package for `..multitalk`; this
loads the repository root as a package (alias PACKAGE_ALIAS) and imports the real module in it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

PACKAGE_ALIAS = "wanvideo_infinitetalk"


def pack_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pack(alias: str = PACKAGE_ALIAS):
    if alias in sys.modules:
        return sys.modules[alias]
    root = pack_root()
    spec = importlib.util.spec_from_file_location(
        alias, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def import_in_pack(dotted: str, alias: str = PACKAGE_ALIAS):
    """Import `dotted` (e.g. 'wanvideo.inspect_report') as a submodule of the aliased pack."""
    load_pack(alias)
    return importlib.import_module(f"{alias}.{dotted}")
