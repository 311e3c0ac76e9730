"""Serving: a trained run answering at any preference (nearest adapter, Rewarded Soup, MOD decoding, conditioned)."""
