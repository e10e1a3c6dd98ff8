"""Whether Triton can be used here (a leaf module: the kernels' entry points import it without
importing each other). Nothing runs at import; the answer is cached after the first call."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True
