"""Running cases: preparing models, running seeds, reusing work, exporting, calibrating, gating, Ray."""
