"""The reward client trainers install: `RewardClient`, `AsyncRewardClient`, the wire types, the
retry policy and the replica list. Import the public names from `trainer_client`."""
