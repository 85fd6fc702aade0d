"""Reading dense checkpoints lazily and writing MoE checkpoints in bounded memory."""
