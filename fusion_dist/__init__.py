"""fusion-dist: distributed training of deep-fusion multimodal LMs (DeepMLF, DMPF) for sentiment analysis."""

__version__ = "0.1.0"
