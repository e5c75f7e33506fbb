"""dpo4rec: LLM-enhanced recommendation aligned by Direct Preference Optimization."""

__version__ = "0.1.0"
