"""Three-stage EVE training with DeepSpeed (SPEC section 2)."""
