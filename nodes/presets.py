"""The `preset` input every method node shares.

The input's default in the UI is the authors' released configuration; a
workflow that leaves the input out (one saved before presets existed, or an API
prompt without it) runs as `custom`, so its widget values keep their meaning."""

from ..attnseg.presets import names


def preset_input(method: str | tuple[str, ...], default: str, what: str) -> dict:
    return {"preset": (names(method), {"default": default, "tooltip": (
        f"The authors' configuration of {what} (the README's preset table gives each one's source). A named preset "
        f"fixes every knob it sets and this node's other inputs are ignored; 'custom': this node's inputs.")})}
