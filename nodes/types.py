"""Socket type names and menu categories shared by the pack's nodes."""

ATTN_STORE = "ATTN_STORE"
ATTN_SCORES = "ATTN_SCORES"

# The node menu by task.
LOADERS = "attnseg/loaders"
TEXT = "attnseg/text"
CAPTURE = "attnseg/capture"
SEGMENT = "attnseg/segment"
REFINE = "attnseg/refine"
MASKS = "attnseg/masks"
GUIDANCE = "attnseg/guidance"
EDIT = "attnseg/edit"
CATEGORY = "attnseg"  # until every node names its task
