"""The held-out check: whether a DPO round's policy orders validation users' texts (never in DPO) the reward's way."""
