"""WanVideo Model Info: shows what the loader detected, in the UI and as a JSON string."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from .model_loader import CATEGORY, WANVIDEOMODEL


def report_json(handle) -> str:
    return json.dumps(handle.summary(), indent=2, sort_keys=True, default=str)


class WanVideoModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanVideoModelInfo",
            display_name="WanVideo Model Info",
            category=CATEGORY,
            description="Shows the loader's report (model type, config, dtype, quantization, "
                        "InfiniteTalk, parameter count) and outputs it as JSON text.",
            inputs=[WANVIDEOMODEL.Input(
                "model", tooltip="A model from WanVideo Model Loader.")],
            outputs=[io.String.Output(display_name="json",
                                      tooltip="The load report as JSON text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        text = report_json(model)
        return io.NodeOutput(text, ui=ui.PreviewText(text))
