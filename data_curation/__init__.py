"""Data curation for EVE pre-training (SPEC section 3): filter, embed, cluster, select, caption, export."""
