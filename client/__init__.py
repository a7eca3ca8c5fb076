"""Site (hospital) side: the Flower ClientApp and the local training and audit tasks."""

FEDSYNTH_PACKAGE = "client"
