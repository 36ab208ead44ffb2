"""rawtune's shared machinery: one training loop and the small builders around it."""
