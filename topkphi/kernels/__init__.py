"""Kernel sources (Triton); each file imports only its kernel language, never torch or model code."""
