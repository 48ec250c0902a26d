"""Step 4, training: DeepLabV3+ (:mod:`.deeplab`, :mod:`.backbones`), the chunk-aware data
loader (:mod:`.data`), the settings of a run (:mod:`.config`), the trainer (:mod:`.train`),
prediction (:mod:`.predict`) and the torch runtime they share (:mod:`.runtime`: devices, CPU
threads, checkpoints)."""
