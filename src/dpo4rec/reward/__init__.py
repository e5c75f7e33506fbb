"""The reward stage: every sampled text scored (by the round's recommender or by text matching), best-vs-worst pairs
for DPO from the train users, all-gap pairs from the validation users for the held-out check, and how far the
reward can be trusted (split-half reliability, a linear probe)."""
