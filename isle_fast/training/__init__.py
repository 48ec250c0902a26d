"""Step 4, training: DeepLabV3+ (:mod:`.deeplab`, :mod:`.backbones`), the chunk-aware data
loader (:mod:`.data`), the trainer (:mod:`.train`) and prediction (:mod:`.predict`)."""
