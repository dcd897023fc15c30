"""What the commands need to know of heads without importing torch (their --help)."""

# attention heads of the time and layer blocks of the transformer heads (official Whisper-AT: 1 and 8)
TIME_ATTN_HEADS, LAYER_ATTN_HEADS = 1, 8
# the kinds `kinds.py` defines, in its order (what the commands offer; tests/test_head_kinds.py checks
# it against the registry `HEADS`)
BUILTIN_KINDS = ("last-mlp", "wa-mlp", "wa-tr", "tl-tr")
