"""The floor everything stands on: pure math (sparse teacher logits, KD losses, alpha/LR schedules), the
typed-config machinery, and small runtime and monitoring helpers. Imports nothing else of pd_dist."""
