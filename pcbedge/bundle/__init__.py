"""Bundles on disk: the manifest (read, validated, hashed) and atomic writes that only replace
what pcbedge made. Torch-free, the bottom layer every verb and family builds on."""
