"""Expert weights: the source interface, the packed on-disk format and its store."""
