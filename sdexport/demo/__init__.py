"""The bundled small model: its data, training, semantic check, the demo command and tiny test builders."""
