"""Preference pairs from recommender rewards, and DPO on the LLM."""
