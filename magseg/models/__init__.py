"""Model parts beyond smp's: offline pretrained weights, the FCtL multi-context segmenter."""
