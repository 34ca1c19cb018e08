"""Pretraining: raw text, masking, packing, the MLM/NSP and ELMo training loops."""
