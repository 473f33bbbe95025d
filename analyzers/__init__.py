"""Analyzers: pure analysis of recorded memory events and capacity plans; never imports torch."""
