"""Synthetic VOC-like data sets: textured objects, ground truth and pseudo-label sets
whose per-class quality the caller sets (:mod:`.datasets`)."""
