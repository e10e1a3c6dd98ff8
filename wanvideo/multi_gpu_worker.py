"""`python -m wanvideo.multi_gpu_worker`: one rank of the multi-GPU runtime.

Started by multitalk.multi_gpu.WorkerPool, or by hand under torchrun on one or several hosts
(docs/MULTI_GPU.md). The worker itself is multitalk/multi_gpu_worker.py; this front end only makes
a top-level run find the pack (the library under wanvideo/ never imports multitalk/ itself).
"""

if __name__ == "__main__":
    from ._pack import import_in_pack

    import_in_pack("multitalk.multi_gpu_worker").main()
