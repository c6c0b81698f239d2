"""pd-dist: pre-training distillation of causal LMs on DeepSpeed."""
__version__ = "0.1.0"
