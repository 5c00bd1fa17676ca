"""Training: launcher detection, DeepSpeed engine, the loop, and MMSA metrics."""
