"""DPO (TRL + LoRA) on a round's preference pairs: the trainer, one prompt per user's pair, frozen lower layers."""
