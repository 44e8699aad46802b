class AttnSegError(ValueError):
    """A user-facing error: the message names the input at fault and the fix.

    Nodes let these propagate unchanged so ComfyUI shows the message as is."""
