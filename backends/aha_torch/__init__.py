"""The ``torch`` backend: AHA on any torch device through scaled_dot_product_attention."""
