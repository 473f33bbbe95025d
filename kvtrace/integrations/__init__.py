"""Engine integrations: Hugging Face caches, custom module caches, eviction presses."""
