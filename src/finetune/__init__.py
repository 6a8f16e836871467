"""finetune: transfer learning on images with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
