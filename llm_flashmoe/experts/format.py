"""The packed expert format of a converted model directory (see README)."""

MANIFEST_NAME = "experts.json"
