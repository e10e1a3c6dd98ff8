"""WanVideo Multi-GPU: which GPUs share each window, for the sampler's multi_gpu input.

The work is multitalk.multi_gpu's: worker processes, one per GPU, each with its own copy of the
model loaded from the files and options the model loader recorded (handle.load_spec). This
module only turns the node's settings into a Placement, keeps the pool's life tied to the model
handle ComfyUI caches (the workers stop when ComfyUI drops the model, or when it exits), and
gives the sampler a window sampler. docs/MULTI_GPU.md is the user's guide.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

from comfy_api.latest import io

CATEGORY = "WanVideo InfiniteTalk"
WANVIDEOMULTIGPU = io.Custom("WANVIDEOMULTIGPU")
MODES = ["auto", "sequence", "guidance"]   # multitalk.multi_gpu.MODES (schema stays torch-free)
TRANSPORTS = ["auto", "copy_engine", "send_recv"]   # wanvideo.peer_copy.TRANSPORTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiGpuArgs:
    """Output of "WanVideo Multi-GPU": the devices (as typed), the split mode and how split
    attention moves its data between GPUs."""

    gpus: str = "all"
    mode: str = "auto"
    transport: str = "auto"

    def placement(self):
        """multi_gpu.Placement, or None when only one device is named (runs in ComfyUI's
        process as without the node)."""
        from ..multitalk.multi_gpu import Placement

        placement = Placement.parse(self.gpus, self.mode)
        if placement.world == 1:
            log.info("WanVideo Multi-GPU: gpus %r names one device (%s); sampling in this "
                     "process as without the node", self.gpus, placement.devices[0])
            return None
        return placement


class WanVideoMultiGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanVideoMultiGPU",
            display_name="WanVideo Multi-GPU",
            category=CATEGORY,
            description="Shares every window's denoising between several GPUs of this machine: "
                        "one worker process per GPU, each holding its own copy of the model. "
                        "Connect to the sampler's multi_gpu input. With one GPU the sampler "
                        "runs as without this node.",
            inputs=[
                io.String.Input(
                    "gpus", default="all",
                    tooltip="Which GPUs: 'all', or CUDA indices like '0,1' (as nvidia-smi "
                            "numbers them after CUDA_VISIBLE_DEVICES). Each GPU needs the whole "
                            "model (or BlockSwap) and the same free memory; use GPUs of one "
                            "kind. 'cpu:2' runs two CPU processes instead (for tests only: "
                            "slow)."),
                io.Combo.Input(
                    "mode", options=MODES, default="auto",
                    tooltip="How the GPUs share a step. auto: guidance passes on different "
                            "GPUs when they split evenly (2 passes on 2 GPUs), otherwise every "
                            "pass split by tokens (sequence). sequence: always split the tokens "
                            "of each pass (best for 1 or 3 passes on 2 GPUs). guidance: one "
                            "pass per GPU (3 passes on 2 GPUs leave one GPU idle a third of "
                            "the time); extra GPUs split tokens."),
                io.Combo.Input(
                    "transport", options=TRANSPORTS, default="auto", optional=True,
                    tooltip="How GPUs that split tokens exchange attention data. auto: the "
                            "GPUs' copy engines where every GPU can reach the others' memory "
                            "(NVLink, PCIe peer access), else NCCL send/recv. copy_engine: "
                            "always (an error where it cannot run). send_recv: always NCCL "
                            "(try it if a split run fails or hangs). Same output either way."),
            ],
            outputs=[WANVIDEOMULTIGPU.Output(
                display_name="multi_gpu",
                tooltip="Multi-GPU settings for the WanVideo InfiniteTalk Sampler.")],
        )

    @classmethod
    def execute(cls, gpus: str = "all", mode: str = "auto",
                transport: str = "auto") -> io.NodeOutput:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {TRANSPORTS}")
        args = MultiGpuArgs(str(gpus), str(mode), str(transport))
        placement = args.placement()   # refuses unknown GPUs and modes now, before sampling
        if placement is not None:
            log.info("WanVideo Multi-GPU: %d devices (%s), mode %s, transport %s", placement.world,
                     ", ".join(placement.devices), placement.mode, transport)
        return io.NodeOutput(args)


def _spec(handle):
    from ..multitalk.multi_gpu import ModelSpec

    spec = dict(getattr(handle, "load_spec", None) or {})
    if not spec:
        raise ValueError("multi_gpu: the model must come from WanVideo Model Loader (each GPU's "
                         "worker loads its own copy from the same file)")
    return ModelSpec.make(".multitalk.multi_gpu_worker:load_checkpoint", **spec)


def _hand_over(handle) -> None:
    """The workers hold their own copies now: this process's copy is dropped (its tensors become
    meta tensors, so preflight still reads the shapes) instead of sitting in host RAM or GPU 0.
    ensure_local loads it again if a later prompt samples in this process."""
    import torch

    from ..wanvideo import placement

    wan = handle.model
    if handle.device is not None and torch.device(handle.device).type == "meta":
        return
    meta = torch.device("meta")
    streamer = getattr(wan, "block_streamer", None)
    if streamer is not None and hasattr(streamer, "detach"):
        streamer.detach(wan, to=meta)
    placement.move_module(wan, meta)
    handle.device = meta
    log.info("WanVideo Multi-GPU: the workers hold the model; this process's copy is released "
             "(loaded again from %s if a prompt samples here)", handle.name or "its file")


def ensure_local(handle):
    """The model in this process: the handle's, or loaded again from the loader's files and
    options after _hand_over released it."""
    import torch

    if handle.device is None or torch.device(handle.device).type != "meta":
        return handle.model
    import comfy.model_management as mm

    from ..multitalk.multi_gpu_worker import load_checkpoint

    spec = dict(handle.load_spec)
    log.info("WanVideo Multi-GPU: loading %s into this process again (sampling here)",
             handle.name or "the model")
    compute = mm.get_torch_device()
    handle.model = load_checkpoint(compute, **spec)
    handle.device = compute if spec.get("load_device") == "main_device" else torch.device("cpu")
    return handle.model


def window_sampler(handle, args: MultiGpuArgs, block_swap: dict | None):
    """(window_sampler for generate_video, release callable), or (None, None) for one device.
    The pool is kept between prompts (same model and devices); it stops when ComfyUI drops this
    model handle, when ComfyUI exits, or after a failure (the next prompt starts a new one)."""
    from ..multitalk import multi_gpu

    placement = args.placement()
    if placement is None:
        return None, None
    spec = _spec(handle)
    pool = multi_gpu.shared_pool(spec, placement)
    _hand_over(handle)
    if getattr(handle, "_multi_gpu_finalizer", None) is None:
        handle._multi_gpu_finalizer = weakref.finalize(handle, multi_gpu.shutdown_shared, spec)
    swap = dict(block_swap) if block_swap else None

    def sample(job, callbacks):
        return pool.sample_window(job, callbacks, block_swap=swap, mode=args.mode,
                                  sp_options={"transport": args.transport})

    def release():
        if pool.alive:
            pool.release()

    return sample, release
