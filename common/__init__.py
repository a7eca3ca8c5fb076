"""Shared building blocks: config, phantoms, site data, model, file I/O. Imports nothing else of ours."""
