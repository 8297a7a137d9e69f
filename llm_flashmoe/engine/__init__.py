"""The inference engine: model math, caches, sampling and the generation loop."""
