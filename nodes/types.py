"""Socket type names shared by the pack's nodes."""

ATTN_STORE = "ATTN_STORE"
ATTN_SCORES = "ATTN_SCORES"
CATEGORY = "attnseg"
