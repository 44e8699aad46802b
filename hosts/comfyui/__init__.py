"""The ComfyUI host: UNet introspection, attention-capture patches, the
segmentation pass and the capture sampler."""
