"""raytune_ft: distributed fine-tuning of Hugging Face models on Ray."""

__version__ = "0.1.0"
