"""ComfyUI entry point of the WanVideo InfiniteTalk node pack.

Importing this package has no side effects: ComfyUI calls `comfy_entrypoint`, which imports the
node adapters (and through them ComfyUI) only then. This keeps the library importable without
ComfyUI, e.g. by the tests and `python -m wanvideo.inspect`.
"""

WEB_DIRECTORY = None


async def comfy_entrypoint():
    from .nodes import WanVideoInfiniteTalkExtension

    return WanVideoInfiniteTalkExtension()
