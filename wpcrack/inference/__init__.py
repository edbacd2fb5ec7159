"""The trained network as a function of images: load a checkpoint, predict tiled or patch-gated,
make CAMs. The layer evaluate, deploy, the diagnostics and the survey flow all use from above; it
knows no dataset's protocol (``wpcrack.evaluate.protocol``) and no photo's scale
(``wpcrack.deploy.scale``)."""
