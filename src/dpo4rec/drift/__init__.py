"""The drift stage: round t's texts under the rewards of earlier rounds (did DPO move what it was trained on?)."""
