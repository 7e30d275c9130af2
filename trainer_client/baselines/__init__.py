"""Offline baselines on the trainer side: sampling k responses per prompt from the SFT policy
(`sampling`), the baseline JSONL records (`records`) and their upload (`push`)."""
