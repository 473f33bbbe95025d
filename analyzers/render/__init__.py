"""Renderers: a computed result in, text, JSON or HTML out; they compute nothing."""
