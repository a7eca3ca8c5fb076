"""Consortium server side: the Flower ServerApp, checkpoints, synthesis, the CLI and the demo."""

FEDSYNTH_PACKAGE = "server"
