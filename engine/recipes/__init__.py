"""Commands assembled from the components: one readable file per command."""
