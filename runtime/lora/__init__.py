"""LoRAs applied to an exported artifact's weights when its sessions are created (no re-export, no torch).

- :mod:`runtime.lora.weights`: the manifest's weight map (module name -> the graph's weight: name,
  transposed or not, shape, dtype), written at export.
- :mod:`runtime.lora.keys`: LoRA key layouts (diffusers/PEFT, old diffusers, kohya), shared with the
  export-time fusion in ``sdexport.sources.lora``.
- :mod:`runtime.lora.read`: a LoRA file read with numpy into low-rank modules.
- :mod:`runtime.lora.resolve`: modules matched to the artifact's weights, per component.
- :mod:`runtime.lora.onnx_weights` / :mod:`runtime.lora.openvino_patch`: the base weights read and the
  patched ones handed to each backend.
"""
