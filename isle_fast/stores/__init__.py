"""Stores and ingest: the Zarr stack stores (:mod:`.stack`) and the readers that fill them
from label PNGs, CAM files, images, TIFFs and arrays (:mod:`.ingest`, :mod:`.ingest_tiff`,
:mod:`.ingest_arrays`, run by :mod:`.ingest_engine`;
:mod:`.formats`); the CAM
layouts of the public WSSS code (:mod:`.cams`), the restricted unpickler their files are read with
(:mod:`.safe_pickle`), and image-level labels (:mod:`.image_labels`)."""
