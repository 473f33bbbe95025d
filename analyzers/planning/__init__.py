"""Planning: what fits (plan, presets) and why a run did not (diagnose)."""
