"""File formats other tools read and write: GGUF import and export."""
