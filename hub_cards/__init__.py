"""Model-card template and the mask repos shipped with leank-hf (installed as `leank_hf.hub_cards`)."""
