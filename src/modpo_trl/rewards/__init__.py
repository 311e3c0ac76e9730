"""Frozen rewards: reward sources behind one interface, reward vectors, reward-model training, the offline
scorers and the content-addressed score cache."""
