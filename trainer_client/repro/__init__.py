"""The reproduction of Shen et al. 2024 (contrastive rewards) on a task small enough for a laptop.

`task` defines a text task whose true (gold) reward is known, `models` builds its word-level
tokenizer, a tiny SFT policy and proxy reward models trained on gold-labelled pairs with a
fraction of flipped labels, and `grid` runs PPO with raw and with contrastive proxy rewards and
judges the results by the gold reward. Nothing here is imported by ``import trainer_client``.
"""
