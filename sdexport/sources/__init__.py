"""Model sources: what an export reads (``open.open_source`` returns a ``base.Source``).

base         the Source protocol every source satisfies; message helpers
diffusers    diffusers folders (DiffusersSource) and ControlNet folders
single_file  single-file checkpoints as sources (SingleFileSource), and writing them
checkpoint   checkpoint files tensor by tensor: safetensors (over runtime.safetensors), safe .ckpt loading
detect       which SD 1.x/2.x model a single file holds, from tensor names and shapes
convert      original (LDM) <-> diffusers tensor names
models       empty models from configs, the shipped config folders (configs/)
lora         LoRA files: read, matched to layers, fused, merged, refit sets
merge        checkpoint merging, streamed
open         open_source: picks the kind, lays LoRAs or a few-step scheduler over it
clip_vocab   the CLIP vocabulary rebuilt offline
"""
