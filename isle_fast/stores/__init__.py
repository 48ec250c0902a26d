"""Stores and ingest: the Zarr stack stores (:mod:`.stack`) and the readers that fill them
from label PNGs, CAM files, images, TIFFs and arrays (:mod:`.ingest`, :mod:`.formats`)."""
