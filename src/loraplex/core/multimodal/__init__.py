"""Multimodal inputs: images and audio from the prompt to the encoder towers (docs/multimodal.md)."""
