"""Where models wait between uses: the warm tier (evicted models parked in CPU RAM) and the moves
of PyTorch weights between a device and (pinned) CPU memory."""
