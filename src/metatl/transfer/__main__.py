"""``python -m metatl.transfer CKPT [CKPT ...] --target mnist --per-class 50``: the transferability
scores (LEEP, NCE, LogME, H-score) of checkpoints on a digits target set, as JSON lines
(:func:`metatl.transfer.transferability.main`)."""

from metatl.transfer.transferability import main

main()
