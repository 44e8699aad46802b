"""Socket type names and menu categories shared by the pack's nodes."""

# Socket types, prefixed with the pack's name so no other pack's type of the same
# name can be connected to them (they were ATTN_STORE and ATTN_SCORES).
ATTNSEG_STORE = "ATTNSEG_STORE"  # an AttentionStore: the attention a capture node recorded
ATTNSEG_SCORES = "ATTNSEG_SCORES"  # ScoreMaps: one score map per class and image
ATTNSEG_INVERSION = "ATTNSEG_INVERSION"  # an Inversion: an image's inverted noise (and null-text's embeddings)

# The node menu by task.
LOADERS = "attnseg/loaders"
TEXT = "attnseg/text"
CAPTURE = "attnseg/capture"
SEGMENT = "attnseg/segment"
REFINE = "attnseg/refine"
MASKS = "attnseg/masks"
GUIDANCE = "attnseg/guidance"
EDIT = "attnseg/edit"
