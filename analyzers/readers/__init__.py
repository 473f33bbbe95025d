"""Readers: every input kvtrace accepts (run directories, Chrome traces, snapshots), as the model."""
