"""Synthetic VOC-like data sets: textured objects, ground truth and pseudo-label sets
whose per-class quality the caller sets: the data set (:mod:`.datasets`), one image and its sets
(:mod:`.samples`), the quality matrices (:mod:`.quality`), the CAM / ``cls_labels.npy`` files of the
public WSSS code (:mod:`.wsss_files`) and small image operations (:mod:`.imageops`); a small
scene for the refinement tests and benchmarks (:mod:`.scene`). The VOC palette
and label PNGs are :mod:`isle_fast.stores.png`'s."""
