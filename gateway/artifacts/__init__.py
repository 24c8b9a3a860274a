"""Artifact container formats fleet servers wrap MCUboot images in (Mender/RDFM)."""
