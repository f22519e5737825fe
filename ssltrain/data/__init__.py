"""Corpora, tokenizers, packing into fixed-length blocks, and resumable batch loading."""
